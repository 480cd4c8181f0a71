//! cargo-fuzz target: the body is `sluice::fuzzing::virtio_blk_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::virtio_blk_decode(data));
