#!/bin/sh
# Installs php-fpm from the distribution and enables it. PHP_VERSION comes from the template.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "php${PHP_VERSION}-fpm" "php${PHP_VERSION}-cli"
mkdir -p /etc/amibake
echo "php ${PHP_VERSION}" > /etc/amibake/php-version
