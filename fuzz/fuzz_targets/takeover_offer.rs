#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| handover::fuzzing::takeover_offer(data));
