//! libFuzzer target: see `darter_fuzz::exercise::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| darter_fuzz::exercise::image(data));
