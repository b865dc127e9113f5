#!/bin/sh
# Writes a systemd unit that runs the baked worker; runs inside the image's chroot, so it
# enables the unit by link rather than through a running systemd.
set -eu
cat > "/etc/systemd/system/${APP}.service" <<UNIT
[Unit]
Description=${APP} queue worker
After=network-online.target

[Service]
ExecStart=/opt/${APP}/bin/worker
Restart=always
User=root

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf "/etc/systemd/system/${APP}.service" "/etc/systemd/system/multi-user.target.wants/${APP}.service"
