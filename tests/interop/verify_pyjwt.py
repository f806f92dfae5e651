#!/usr/bin/env python3
"""Verifies a tower-fhir token with PyJWT, an independent JWT implementation.

Usage: verify_pyjwt.py JWKS_FILE TOKEN_FILE AUDIENCE ISSUER
Prints the verified claims as JSON; exits non-zero (with the reason on stderr) otherwise.
"""
import json
import sys

import jwt


def main() -> int:
    jwks_path, token_path, audience, issuer = sys.argv[1:5]
    with open(jwks_path) as f:
        jwks = json.load(f)
    with open(token_path) as f:
        token = f.read().strip()
    kid = jwt.get_unverified_header(token)["kid"]
    keys = {key.key_id: key for key in jwt.PyJWKSet.from_dict(jwks).keys}
    key = keys[kid]
    claims = jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm_name],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )
    print(json.dumps(claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
