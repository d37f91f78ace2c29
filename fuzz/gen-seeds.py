#!/usr/bin/env python3
"""Writes the fuzz fixtures (fuzz/fixtures/) and seed corpora (fuzz/seeds/). Run once; the
output is committed. Needs python3 with `cryptography`. Re-running makes new keys, so the
JWKS, the tokens and the certificates change together."""
import base64, datetime, json, os, struct, shutil
from pathlib import Path
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, padding, utils

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
FIX = FUZZ / "fixtures"
SEEDS = FUZZ / "seeds"
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def put(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fuzz")])


def ca_cert(subject_key, subject, issuer_key, issuer, path_len, years=90):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=365 * years))
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    return b.sign(issuer_key, hashes.SHA256())


def csr(key, cn, sans=()):
    b = x509.CertificateSigningRequestBuilder().subject_name(name(cn))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(key, hashes.SHA256())


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(key, alg, kid, claims):
    header = {"alg": alg, "kid": kid, "typ": "JWT"} if kid else {"alg": alg, "typ": "JWT"}
    signing = (b64u(json.dumps(header).encode()) + "." + b64u(json.dumps(claims).encode())).encode()
    if alg == "RS256":
        sig = key.sign(signing, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = utils.decode_dss_signature(key.sign(signing, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing.decode() + "." + b64u(sig)


def int_b64u(n):
    return b64u(n.to_bytes((n.bit_length() + 7) // 8, "big"))


shutil.rmtree(SEEDS, ignore_errors=True)
shutil.rmtree(FIX, ignore_errors=True)

# ---- audit_chain: the audit key whose checkpoints the fuzzer cannot forge -----------------
audit = ec.generate_private_key(ec.SECP256R1())
put(FIX / "audit-key.pub.der", audit.public_key().public_bytes(DER, SPKI))
for i in range(3):
    put(SEEDS / "audit_chain" / f"random-{i}", os.urandom(64 * (i + 1)))

# ---- ceremony: the files the deploy/ceremonies examples name --------------------------------
root_key = ec.generate_private_key(ec.SECP384R1())
root = ca_cert(root_key, name("Fuzz Root 2026"), root_key, name("Fuzz Root 2026"), 2)
root2_key = ec.generate_private_key(ec.SECP384R1())
root2 = ca_cert(root2_key, name("Fuzz Root 2031"), root2_key, name("Fuzz Root 2031"), 2)
env_key = ec.generate_private_key(ec.SECP256R1())
env = ca_cert(env_key, name("Fuzz Prod Env 2026"), root_key, root.subject, 1, years=20)
cer = FIX / "ceremony"
put(cer / "root-2026.pem", root.public_bytes(PEM))
put(cer / "root-2031.pem", root2.public_bytes(PEM))
put(cer / "prod-env-2026.pem", env.public_bytes(PEM))
put(cer / "prod-env-2026.csr", csr(env_key, "Fuzz Prod Env 2026").public_bytes(PEM))
put(cer / "prod-eu1-2026.csr", csr(ec.generate_private_key(ec.SECP256R1()), "Fuzz eu1").public_bytes(PEM))
for f in ["01-root-key", "02-root-cert", "04-prod-env-csr", "05-prod-env-intermediate", "09-root-crl",
          "12-cross-sign-prod-env-2031"]:
    put(SEEDS / "ceremony" / f"{f}.yaml", (ROOT / "deploy/ceremonies" / f"{f}.yaml").read_bytes())

# ---- csr_judge: header (requested validity, default and max TTL, issuer notAfter, flags) ---
# + CSR. Layout documented in fuzz_targets/csr_judge.rs.
ID = "spiffe://cluster.local/ns/default/sa/sleep"
def header(validity, default, mx, issuer_after, clamp):
    return struct.pack("<qqqqB", validity, default, mx, issuer_after, 1 if clamp else 0)
wl = ec.generate_private_key(ec.SECP256R1())
rsak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
far = 4102444800  # 2100-01-01
cases = {
    "own-uri": (header(0, 86400, 172800, far, False), csr(wl, "sleep", [x509.UniformResourceIdentifier(ID)]).public_bytes(PEM)),
    "no-san-rsa": (header(3600, 86400, 172800, far, True), csr(rsak, "w").public_bytes(PEM)),
    "other-uri": (header(0, 86400, 172800, far, False), csr(wl, "sleep", [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y")]).public_bytes(PEM)),
    "dns-ip": (header(10**9, 86400, 172800, far, True), csr(wl, "sleep", [x509.DNSName("a.example"), x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))]).public_bytes(PEM)),
    "der": (header(60, 86400, 172800, far, False), csr(wl, "sleep", [x509.UniformResourceIdentifier(ID)]).public_bytes(DER)),
}
for k, (h, body) in cases.items():
    put(SEEDS / "csr_judge" / k, h + body)

# ---- sa_token: tokens signed by keys the fixture JWKS holds ---------------------------------
rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ek = ec.generate_private_key(ec.SECP256R1())
rn = rk.public_key().public_numbers()
en = ek.public_key().public_numbers()
jwks = {"keys": [
    {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig", "n": int_b64u(rn.n), "e": int_b64u(rn.e)},
    {"kty": "EC", "kid": "ec-1", "alg": "ES256", "use": "sig", "crv": "P-256",
     "x": b64u(en.x.to_bytes(32, "big")), "y": b64u(en.y.to_bytes(32, "big"))},
]}
put(FIX / "jwks.json", json.dumps(jwks, indent=1))
ISS = "https://kubernetes.default.svc.cluster.local"
def claims(**kw):
    c = {"iss": ISS, "aud": ["istio-ca"], "exp": far, "iat": 1700000000, "nbf": 1700000000,
         "sub": "system:serviceaccount:default:sleep",
         "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "sleep", "uid": "u"},
                           "pod": {"name": "sleep-1", "uid": "p"}}}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}
tokens = {
    "rsa-valid": jwt(rk, "RS256", "rsa-1", claims()),
    "ec-valid": jwt(ek, "ES256", "ec-1", claims()),
    "sub-only": jwt(rk, "RS256", "rsa-1", claims(**{"kubernetes.io": None})),
    "k8s-only": jwt(ek, "ES256", "ec-1", claims(sub=None)),
    "mismatch": jwt(rk, "RS256", "rsa-1", claims(sub="system:serviceaccount:kube-system:admin")),
    "bad-name": jwt(ek, "ES256", "ec-1", claims(sub="system:serviceaccount:Default:x_y", **{"kubernetes.io": None})),
    "expired": jwt(rk, "RS256", "rsa-1", claims(exp=1700000100)),
    "wrong-aud": jwt(ek, "ES256", "ec-1", claims(aud="other")),
    "unknown-kid": jwt(ek, "ES256", "ec-9", claims()),
    "no-kid": jwt(rk, "RS256", None, claims()),
}
for k, t in tokens.items():
    put(SEEDS / "sa_token" / k, t)

# ---- server_config: TOML, then optionally a NUL and KEY=VALUE environment lines -------------
yaml = (ROOT / "deploy/kubernetes/ca-server.yaml").read_text().splitlines()
i = next(n for n, l in enumerate(yaml) if "config.toml: |" in l) + 1
block = []
for l in yaml[i:]:
    if not (l.startswith("    ") or l == ""):
        break
    block.append(l[4:])
k8s = "\n".join(block) + "\n"
put(SEEDS / "server_config" / "kubernetes.toml", k8s)
istio = k8s + """
[istio]
listen = "0.0.0.0:9443"
server_names = ["ca.pki.svc"]
serving_cluster = "eu1"

[istio.clusters.eu1]
sa_issuer = "https://kubernetes.default.svc.cluster.local"
jwks_file = "eu1-jwks.json"
default_ttl = "24h"
max_ttl = "48h"
over_max = "clamp"
trusted_node_accounts = ["istio-system/ztunnel"]

[policy]
[rotation]
workload_ttl = "24h"
"""
put(SEEDS / "server_config" / "istio.toml", istio)
put(SEEDS / "server_config" / "env-overrides", k8s.encode() + b"\0CA_SERVER_DATABASE__URL=sqlite://x.db\nCA_SERVER_LOG__FORMAT=text\nCA_SERVER_ISTIO__BATCH_MAX=3\n")

# ---- keyref ---------------------------------------------------------------------------------
refs = {
    "file": "file:keys/ca.key",
    "pkcs11-env": "pkcs11:token=root-hsm;object=root-2026?pin-source=env:ROOT_PIN",
    "pkcs11-full": "pkcs11:token=prod%20env;object=a%2Fb;type=private?module-path=/opt/hsm/lib/libpkcs11.so&pin-source=file:/etc/pin",
    "pkcs11-rfc-pin": "pkcs11:token=t;object=o?pin-source=/run/pin",
    "pin-value": "pkcs11:token=t;object=o?pin-value=1234",
}
for k, v in refs.items():
    put(SEEDS / "keyref" / k, v)
print("ok")
