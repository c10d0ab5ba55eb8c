#!/usr/bin/env bash
# Makes a throwaway PKI for trying TLS locally and in tests (never for production):
#
#   OUT/cluster-ca.pem            the cluster CA: signs router and node certificates for the
#                                 data plane (mutual TLS) and etcd's certificates
#   OUT/member.pem, member.key    a cluster member's certificate (server and client use), for
#                                 routers, expert nodes and etcd clients
#   OUT/etcd.pem, etcd.key        etcd's server certificate (cluster CA)
#   OUT/public-ca.pem             the CA clients of the public API trust
#   OUT/public.pem, public.key    the router's public gRPC/HTTP certificate (public CA)
#   OUT/client.pem, client.key    an API client's certificate (public CA), for --tls-client-ca
#
# Every certificate names localhost, 127.0.0.1 and ::1 plus any extra names given in
# MOE_TLS_NAMES (comma-separated DNS names, e.g. "router,node-0,etcd"). Keys are EC P-256,
# valid for 30 days. Needs only the openssl command.
#
# Usage: ops/tls/make-test-certs.sh OUT_DIR
set -euo pipefail

out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
cd "$out"
days=30

san="DNS:localhost,IP:127.0.0.1,IP:::1"
IFS=',' read -ra extra <<< "${MOE_TLS_NAMES:-}"
for name in "${extra[@]}"; do
    [ -n "$name" ] && san="$san,DNS:$name"
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # ca NAME SUBJECT
    key "$1.key"
    openssl req -x509 -new -key "$1.key" -sha256 -days "$days" -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$1.pem" 2>/dev/null
}

leaf() { # leaf NAME CA SUBJECT EXTENDED_KEY_USAGE
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$3" -out "$1.csr" 2>/dev/null
    cat > "$1.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$4
subjectAltName=$san
EXT
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
        -days "$days" -sha256 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

ca cluster-ca "moe test cluster CA"
ca public-ca "moe test public CA"
leaf member cluster-ca "moe cluster member" "serverAuth,clientAuth"
leaf etcd cluster-ca "etcd" "serverAuth,clientAuth"
leaf public public-ca "moe router" "serverAuth"
leaf client public-ca "moe api client" "clientAuth"
rm -f ./*.srl
chmod 600 ./*.key
echo "test certificates in $out"
