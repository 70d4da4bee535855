#!/usr/bin/env bash
# Self-signed certificates for a TLS deployment (demo and tests, not production):
#   docker/certs.sh DIR HOST [HOST...]
# writes DIR/ca.crt (the CA every client trusts), DIR/server.pem and DIR/server.key (the certificate
# every Flower server presents). HOST names every address a client dials: the certificate is valid
# for all of them, e.g. `localhost 127.0.0.1 superlink supernode-1 supernode-2` for the compose demo.
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 DIR HOST [HOST...]" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "$0: openssl is not installed" >&2; exit 1; }

dir=$1
shift
mkdir -p "$dir"

names=()
for host in "$@"; do
  if [[ $host =~ ^[0-9]+(\.[0-9]+){3}$ || $host == *:* ]]; then
    names+=("IP:$host")
  else
    names+=("DNS:$host")
  fi
done
san=$(IFS=,; echo "${names[*]}")

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 365 -nodes -subj "/CN=fl-sim demo CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -subj "/CN=$1" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days 365 -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -CAcreateserial -out "$dir/server.pem" \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san") \
  2>/dev/null
# The CA key signs nothing else: rerun this script to cover more hosts.
rm -f "$dir/server.csr" "$dir/ca.srl" "$dir/ca.key"
# Flower's containers run as uid 49999, which must read the key from the mounted folder.
chmod 644 "$dir/server.key"
echo "certificates for ${names[*]} in $dir"
