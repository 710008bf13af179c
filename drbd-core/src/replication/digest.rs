//! The digest algorithms `verify-alg` and `csums-alg` name, by their kernel crypto names. Both
//! nodes digest a block and compare the bytes, so each digest is laid out as the kernel's
//! crypto API lays it out (`crc32c`: the CRC as a little-endian word).

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

/// A digest algorithm for online verify, checksum-based resync and data integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlg {
    Crc32c,
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

/// A `verify-alg` / `csums-alg` this implementation does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown digest algorithm '{0}' (known: crc32c, md5, sha1, sha256, sha512)")]
pub struct UnknownDigest(pub String);

impl DigestAlg {
    /// The algorithm of a kernel crypto name.
    pub fn from_name(name: &str) -> Result<DigestAlg, UnknownDigest> {
        match name {
            "crc32c" => Ok(DigestAlg::Crc32c),
            "md5" => Ok(DigestAlg::Md5),
            "sha1" => Ok(DigestAlg::Sha1),
            "sha256" => Ok(DigestAlg::Sha256),
            "sha512" => Ok(DigestAlg::Sha512),
            other => Err(UnknownDigest(other.to_string())),
        }
    }

    /// The algorithm a configuration or packet names, None for an empty name (no
    /// algorithm).
    pub fn from_optional_name(name: &str) -> Result<Option<DigestAlg>, UnknownDigest> {
        if name.is_empty() {
            Ok(None)
        } else {
            DigestAlg::from_name(name).map(Some)
        }
    }

    /// The kernel crypto name.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlg::Crc32c => "crc32c",
            DigestAlg::Md5 => "md5",
            DigestAlg::Sha1 => "sha1",
            DigestAlg::Sha256 => "sha256",
            DigestAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            DigestAlg::Crc32c => 4,
            DigestAlg::Md5 => 16,
            DigestAlg::Sha1 => 20,
            DigestAlg::Sha256 => 32,
            DigestAlg::Sha512 => 64,
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            DigestAlg::Crc32c => crc32c::crc32c(data).to_le_bytes().to_vec(),
            DigestAlg::Md5 => Md5::digest(data).to_vec(),
            DigestAlg::Sha1 => Sha1::digest(data).to_vec(),
            DigestAlg::Sha256 => Sha256::digest(data).to_vec(),
            DigestAlg::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn known_answers() {
        // "123456789": the CRC-32C check value 0xe3069283, as the kernel stores it.
        assert_eq!(hex(&DigestAlg::Crc32c.digest(b"123456789")), "839206e3");
        assert_eq!(
            hex(&DigestAlg::Md5.digest(b"abc")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            hex(&DigestAlg::Sha1.digest(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&DigestAlg::Sha256.digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        for alg in [
            DigestAlg::Crc32c,
            DigestAlg::Md5,
            DigestAlg::Sha1,
            DigestAlg::Sha256,
            DigestAlg::Sha512,
        ] {
            assert_eq!(DigestAlg::from_name(alg.name()), Ok(alg));
            assert_eq!(alg.digest(&[0u8; 4096]).len(), alg.digest_len());
        }
        assert!(DigestAlg::from_name("whirlpool").is_err());
    }
}
