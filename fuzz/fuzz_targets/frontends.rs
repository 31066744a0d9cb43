//! The parsers of the other front-ends (direct messages, the reliable protocol, the plugin's
//! log bodies): any input must parse or be refused with an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = supersynk::logs::entry::parse_body(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = supersynk::messages::wire::parse(text);
        let _ = supersynk::reliable::wire::parse(text);
    }
});
