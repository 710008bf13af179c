//! Feeds arbitrary bytes to the wire decoder (whole and in pieces) and to the bitmap code, and
//! checks that whatever decodes re-encodes to the same bytes and decodes to the same frame.
//!
//! The checks live in `drbd_net::wire::selfcheck::check_decode`, which a regular test also
//! runs over the seed corpus (`drbd-net/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    drbd_net::wire::selfcheck::check_decode(data);
});
