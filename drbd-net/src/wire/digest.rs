//! Digest lengths of the hash algorithms DRBD uses on the wire (`data-integrity-alg`, and
//! the `csums-alg` / `verify-alg` of the resync).

/// The digest length in bytes of the kernel crypto hash `name`, as configured for
/// `data-integrity-alg` (and sent in `P_PROTOCOL`), or `None` for a name not known here.
///
/// The empty name means "no algorithm" and has length 0. Names are matched exactly and
/// case-sensitively, as the kernel's crypto API matches them (`"SHA1"` is not `"sha1"`).
/// Every length is at most [`MAX_DIGEST_LEN`](super::limits::MAX_DIGEST_LEN).
pub fn integrity_digest_len(name: &str) -> Option<usize> {
    let len = match name {
        "" => 0,
        "crc32c" | "crc32" => 4,
        "md4" | "md5" => 16,
        "sha1" => 20,
        "sha224" => 28,
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        _ => return None,
    };
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::limits::MAX_DIGEST_LEN;

    #[test]
    fn known_names_exact_and_bounded() {
        let known = [
            ("", 0),
            ("crc32c", 4),
            ("crc32", 4),
            ("md4", 16),
            ("md5", 16),
            ("sha1", 20),
            ("sha224", 28),
            ("sha256", 32),
            ("sha384", 48),
            ("sha512", 64),
        ];
        for (name, len) in known {
            assert_eq!(integrity_digest_len(name), Some(len), "{name}");
            assert!(len <= MAX_DIGEST_LEN);
        }
        for name in ["SHA1", "Md5", "sha1 ", "hmac(sha1)", "sha3-256", "none"] {
            assert_eq!(integrity_digest_len(name), None, "{name}");
        }
    }
}
