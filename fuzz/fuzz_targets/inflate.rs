//! The permessage-deflate decoder: any payload inflates within the limit or is refused.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = supersynk::ws::deflate::inflate_message(data, 1 << 16) {
        assert!(out.len() <= 1 << 16);
    }
});
