#!/bin/bash
# First start: initialise /var/lib/mysql from the MARIADB_* variables, as the official image does.
set -euo pipefail
if [ "${1:-}" = mariadbd ]; then
  if [ ! -d /var/lib/mysql/mysql ]; then
    : "${MARIADB_ROOT_PASSWORD:?set MARIADB_ROOT_PASSWORD}"
    echo "stand-in mariadb: initialising /var/lib/mysql"
    chown mysql:mysql /var/lib/mysql
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
      --auth-root-authentication-method=normal >/dev/null
    mariadbd --user=mysql --skip-networking --socket=/run/mysqld/init.sock &
    pid=$!
    for _ in $(seq 60); do mariadb-admin --socket=/run/mysqld/init.sock ping >/dev/null 2>&1 && break; sleep 1; done
    esc() { printf '%s' "$1" | sed "s/'/''/g"; }
    {
      echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '$(esc "$MARIADB_ROOT_PASSWORD")';"
      echo "CREATE USER 'root'@'%' IDENTIFIED BY '$(esc "$MARIADB_ROOT_PASSWORD")';"
      echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
      if [ -n "${MARIADB_DATABASE:-}" ]; then echo "CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;"; fi
      if [ -n "${MARIADB_USER:-}" ]; then
        echo "CREATE USER '$(esc "$MARIADB_USER")'@'%' IDENTIFIED BY '$(esc "${MARIADB_PASSWORD:-}")';"
        if [ -n "${MARIADB_DATABASE:-}" ]; then echo "GRANT ALL ON \`$MARIADB_DATABASE\`.* TO '$(esc "$MARIADB_USER")'@'%';"; fi
      fi
    } | mariadb --socket=/run/mysqld/init.sock -uroot
    mariadb-admin --socket=/run/mysqld/init.sock -uroot -p"$MARIADB_ROOT_PASSWORD" shutdown
    wait "$pid" || true
    echo "stand-in mariadb: initialised"
  fi
  shift
  exec mariadbd --user=mysql --bind-address=0.0.0.0 --skip-name-resolve "$@"
fi
exec "$@"
