#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| handover::fuzzing::migrate_record(data));
