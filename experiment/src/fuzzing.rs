//! What the `experiment_load` fuzz target (fuzz/) holds the loader to, here so a stable test
//! replays its committed corpus in every CI run.
use crate::model::Experiment;

/// The longest refusal line: the rule, its place, and at most ~200 characters of the input.
pub const MAX_ERROR_LINE: usize = 512;

/// Any text, as an experiment file (our YAML, JSON, or a Chaos Toolkit file): a refusal is
/// one bounded line, and what is accepted is written back (as JSON, as chaosctl sends it to
/// the controller) and read again.
pub fn load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Experiment::parse(text, "fuzz.yaml") {
        Ok(exp) => {
            let again = match serde_json::to_string(&exp) {
                Ok(json) => Experiment::parse(&json, "again.json"),
                Err(e) => panic!("an accepted experiment does not serialize: {e}"),
            };
            if let Err(e) = again {
                panic!("an accepted experiment, written back, is refused: {e}");
            }
        }
        Err(e) => one_bounded_line(&e.to_string()),
    }
}

pub fn one_bounded_line(line: &str) {
    assert!(!line.contains('\n'), "a refusal on several lines: {line:?}");
    assert!(
        line.len() <= MAX_ERROR_LINE,
        "a refusal of {} bytes: {:?}...",
        line.len(),
        &line[..line.floor_char_boundary(300)]
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_corpus_replays() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/experiment_load"
        );
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("the committed corpus") {
            let path = entry.expect("a corpus entry").path();
            super::load(&std::fs::read(&path).expect("a corpus file"));
            n += 1;
        }
        assert!(n >= 10, "{n} inputs in {dir}");
    }
}
