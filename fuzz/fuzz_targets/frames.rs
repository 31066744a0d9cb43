//! The frame layer under tungstenite: any byte stream, cut anywhere, is rewritten or refused,
//! and the result does not depend on how the stream was cut.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let whole = supersynk::ws::deflate::scan_for_fuzzing(stream, usize::MAX, 1 << 16);
    let pieces = supersynk::ws::deflate::scan_for_fuzzing(stream, cut as usize + 1, 1 << 16);
    assert_eq!(whole, pieces);
});
