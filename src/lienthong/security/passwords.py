"""Password hashing (argon2id), a minimum policy and lockout after repeated failures.

Why argon2: memory-hard and maintained (argon2-cffi); the police security
checks review password policy, so the rules are explicit and tested.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
MAX_FAILURES = 5
LOCKOUT_US = 15 * 60 * 1_000_000

_hasher = PasswordHasher()


class WeakPassword(ValueError):
    pass


def check_policy(password: str, username: str) -> None:
    """At least 12 characters, three character classes, and not containing the username."""
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"mật khẩu cần ít nhất {MIN_LENGTH} ký tự / password needs at least {MIN_LENGTH} characters")
    classes = sum([any(c.islower() for c in password), any(c.isupper() for c in password),
                   any(c.isdigit() for c in password), any(not c.isalnum() for c in password)])
    if classes < 3:
        raise WeakPassword("mật khẩu cần 3 trong 4 loại ký tự (thường, hoa, số, ký hiệu) / "
                           "password needs 3 of 4 character classes (lower, upper, digit, symbol)")
    if username and username.lower() in password.lower():
        raise WeakPassword("mật khẩu không được chứa tên đăng nhập / password must not contain the username")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
