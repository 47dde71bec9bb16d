#!/bin/sh
# Refuse to start while a secret is missing or still the placeholder of .env.example ("change-me..."),
# then run the command. Usage: check-env.sh VAR [VAR...] [-- command [args...]]
set -eu
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  name=$1
  shift
  eval "value=\${$name-}"
  case "$value" in
    "")
      echo "error: $name is empty or not set: copy .env.example to .env and set every value" >&2
      exit 1 ;;
    *change-me*)
      echo "error: $name still holds the placeholder of .env.example (change-me...): set a real value in .env" >&2
      exit 1 ;;
  esac
done
[ "$#" -gt 0 ] && shift
[ "$#" -gt 0 ] || exit 0
exec "$@"
