#!/bin/bash
set -euo pipefail
if [ "${1#-}" != "${1:-}" ]; then set -- redis-server "$@"; fi
if [ "${1:-}" = redis-server ]; then
  case " $* " in *" --protected-mode "*|*.conf*) ;; *) set -- "$@" --protected-mode no ;; esac
  exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
