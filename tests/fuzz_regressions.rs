//! Replays every input kept under fuzz/regressions/ (crashes the fuzzers found, and seeds)
//! through the code the fuzz targets drive, with the targets' own checks.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no inputs for {target}");
    out
}

#[test]
fn message_parser_inputs() {
    for (name, data) in inputs("message") {
        // Accepted or refused, never a panic.
        let text = String::from_utf8_lossy(&data);
        let _ = (name, supersynk::hunterpie::message::parse(&text));
    }
}

#[test]
fn inflate_inputs() {
    for (name, data) in inputs("inflate") {
        if let Ok(out) = supersynk::ws::deflate::inflate_message(&data, 1 << 16) {
            assert!(out.len() <= 1 << 16, "{name}");
        }
    }
}

#[test]
fn frame_layer_inputs() {
    // As the fuzz target reads its input: the first byte picks the chunk size.
    for (name, data) in inputs("frames") {
        let Some((&cut, stream)) = data.split_first() else {
            continue;
        };
        let whole = supersynk::ws::deflate::scan_for_fuzzing(stream, usize::MAX, 1 << 16);
        for cut in [cut as usize + 1, 1, 2, 3, 7] {
            assert_eq!(
                whole,
                supersynk::ws::deflate::scan_for_fuzzing(stream, cut, 1 << 16),
                "{name} cut {cut}"
            );
        }
    }
}

#[test]
fn frontend_parser_inputs() {
    for (name, data) in inputs("frontends") {
        // Accepted or refused, never a panic.
        let _ = (&name, supersynk::logs::entry::parse_body(&data));
        let text = String::from_utf8_lossy(&data);
        let _ = supersynk::messages::wire::parse(&text);
        let _ = supersynk::reliable::wire::parse(&text);
    }
}

#[test]
fn body_path_inputs() {
    // As the fuzz target reads its input: frame size, limit, body.
    for (name, data) in inputs("bodies") {
        let [cut, limit, body @ ..] = &data[..] else {
            continue;
        };
        for cut in [*cut as usize + 1, 1, 2, 7] {
            let _ = &name;
            supersynk::http::body::check_for_fuzzing(body, cut, *limit as usize * 16);
        }
    }
}
