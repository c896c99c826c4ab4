#!/bin/sh
# Stand-in for the official image's healthcheck.sh (its arguments are accepted and ignored):
# healthy when the server answers on TCP.
exec mariadb-admin --protocol=tcp -h127.0.0.1 -P3306 ping >/dev/null 2>&1
