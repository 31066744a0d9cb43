//! The HTTP body path: any body, declared or chunked and cut anywhere, is collected whole
//! within the limit or refused as too large, the same way whatever the cut; what is
//! collected goes to every endpoint's parser (channels, logs, admin), which never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the frame size, the second the limit (in 16-byte steps).
    let [cut, limit, body @ ..] = data else { return };
    supersynk::http::body::check_for_fuzzing(body, *cut as usize + 1, *limit as usize * 16);
});
