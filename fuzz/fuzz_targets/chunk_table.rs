//! libFuzzer target: see `darter_fuzz::exercise::chunk_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| darter_fuzz::exercise::chunk_table(data));
