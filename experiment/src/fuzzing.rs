//! What the `experiment_load` fuzz target (fuzz/) holds the loader to, here so a stable test
//! replays its committed corpus in every CI run.
use crate::model::Experiment;
use chaos_agent::fuzzing::one_bounded_line;

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

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_corpus_replays() {
        chaos_agent::fuzzing::replay("experiment_load", super::load);
    }
}
