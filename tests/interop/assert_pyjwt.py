#!/usr/bin/env python3
"""Makes private_key_jwt client assertions with PyJWT and `cryptography`, independent of the
crate: fresh keys (EC P-384, RSA 3072, Ed25519), their public JWK Set, and one assertion
signed with each of ES384, RS384, PS256 and EdDSA.

Usage: assert_pyjwt.py CLIENT_ID TOKEN_URL
Prints {"jwks": {...}, "assertions": {"ES384": "...", ...}} as JSON.
"""
import json
import sys
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def main() -> int:
    client_id, token_url = sys.argv[1:3]
    ec_key = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    public = [
        ("py-ec", json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))),
        ("py-rsa", json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))),
        ("py-ed", json.loads(OKPAlgorithm.to_jwk(ed_key.public_key()))),
    ]
    keys = []
    for kid, jwk in public:
        jwk["kid"] = kid
        jwk["use"] = "sig"
        keys.append(jwk)
    assertions = {}
    for alg, key, kid in [
        ("ES384", ec_key, "py-ec"),
        ("RS384", rsa_key, "py-rsa"),
        ("PS256", rsa_key, "py-rsa"),
        ("EdDSA", ed_key, "py-ed"),
    ]:
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "exp": now + 240,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        assertions[alg] = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})
    print(json.dumps({"jwks": {"keys": keys}, "assertions": assertions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
