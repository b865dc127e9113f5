#!/bin/sh
# Creates the system user the application runs as, and the directory bakes deploy into.
# APP comes from the template.
set -eu
if ! id -u "$APP" >/dev/null 2>&1; then
    useradd --system --home-dir "/srv/$APP" --shell /usr/sbin/nologin "$APP"
fi
install -d -o "$APP" -g "$APP" -m 0755 "/srv/$APP"
mkdir -p /etc/amibake
echo "$APP" > /etc/amibake/app-user
echo "user $APP ready"
