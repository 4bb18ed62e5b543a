//! libFuzzer target: see `darter_fuzz::exercise::tar`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| darter_fuzz::exercise::tar(data));
