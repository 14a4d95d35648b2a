//! Tolerances: `< 300`, `<= 0.01`, `== 200`, `!= 0`, `>= 1`, `100..300` (inclusive), `~ regex`,
//! and `== WORD` for text measures (`== NOERROR`).
use crate::record::Measure;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tolerance {
    text: String,
    rule: Rule,
}

impl PartialEq for Tolerance {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

#[derive(Debug, Clone)]
enum Rule {
    Cmp(Op, f64),
    Text { equal: bool, word: String },
    Range(f64, f64),
    Regex(regex::Regex),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl TryFrom<String> for Tolerance {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let t = text.trim();
        let rule = if let Some(re) = t.strip_prefix('~') {
            Rule::Regex(
                regex::Regex::new(re.trim())
                    .map_err(|e| format!("`{text}`: invalid regex: {e}"))?,
            )
        } else if let Some((a, b)) = t.split_once("..") {
            let (a, b) = (num(&text, a)?, num(&text, b)?);
            if a > b {
                return Err(format!("`{text}`: a range must go from low to high"));
            }
            Rule::Range(a, b)
        } else {
            let (op, rest) = [
                ("<=", Op::Le),
                (">=", Op::Ge),
                ("==", Op::Eq),
                ("!=", Op::Ne),
                ("<", Op::Lt),
                (">", Op::Gt),
            ]
            .iter()
            .find_map(|(p, op)| t.strip_prefix(p).map(|r| (*op, r.trim())))
            .ok_or_else(|| {
                format!("`{text}` must be `< N`, `<= N`, `> N`, `>= N`, `== X`, `!= X`, `A..B` or `~ REGEX`")
            })?;
            match rest.parse::<f64>() {
                Ok(n) if n.is_finite() => Rule::Cmp(op, n),
                _ if matches!(op, Op::Eq | Op::Ne) && !rest.is_empty() => Rule::Text {
                    equal: op == Op::Eq,
                    word: rest.to_string(),
                },
                _ => return Err(format!("`{text}`: `{rest}` is not a number")),
            }
        };
        Ok(Tolerance { text, rule })
    }
}

fn num(text: &str, s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .ok_or_else(|| format!("`{text}`: `{}` is not a number", s.trim()))
}

impl From<Tolerance> for String {
    fn from(t: Tolerance) -> String {
        t.text
    }
}

impl Tolerance {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a measured value is within tolerance. A measure without the kind of value the
    /// rule needs (no number for `< 300`) is out of tolerance.
    pub fn holds(&self, value: Option<f64>, text: Option<&str>) -> bool {
        match &self.rule {
            Rule::Cmp(op, n) => value.is_some_and(|v| match op {
                Op::Lt => v < *n,
                Op::Le => v <= *n,
                Op::Gt => v > *n,
                Op::Ge => v >= *n,
                Op::Eq => (v - n).abs() < 1e-9,
                Op::Ne => (v - n).abs() >= 1e-9,
            }),
            Rule::Range(a, b) => value.is_some_and(|v| v >= *a && v <= *b),
            Rule::Text { equal, word } => {
                let got = text
                    .map(str::to_string)
                    .or_else(|| value.map(|v| v.to_string()));
                got.is_some_and(|g| g.eq_ignore_ascii_case(word) == *equal)
            }
            Rule::Regex(re) => {
                let got = text
                    .map(str::to_string)
                    .or_else(|| value.map(|v| v.to_string()));
                got.is_some_and(|g| re.is_match(&g))
            }
        }
    }

    /// Checks `m` and records the tolerance on it.
    pub fn check(&self, m: &mut Measure) {
        m.ok = self.holds(m.value, m.text.as_deref());
        m.tolerance = Some(self.text.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Tolerance {
        Tolerance::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn comparators_ranges_words_and_regexes() {
        assert!(t("< 300").holds(Some(299.9), None));
        assert!(!t("< 300").holds(Some(300.0), None));
        assert!(t("<= 0.01").holds(Some(0.01), None));
        assert!(t(">= 1").holds(Some(1.0), None));
        assert!(t("> 1").holds(Some(1.5), None) && !t("> 1").holds(Some(1.0), None));
        assert!(t("== 200").holds(Some(200.0), None));
        assert!(t("!= 0").holds(Some(2.0), None) && !t("!= 0").holds(Some(0.0), None));
        assert!(t("100..300").holds(Some(100.0), None) && t("100..300").holds(Some(300.0), None));
        assert!(!t("100..300").holds(Some(300.1), None));
        assert!(t("== NOERROR").holds(Some(0.0), Some("noerror")));
        assert!(t("!= NXDOMAIN").holds(None, Some("NOERROR")));
        assert!(t("~ ^ok").holds(None, Some("ok\n")) && !t("~ ^ok").holds(None, Some("not ok")));
        // No value where a number is needed: out of tolerance, never silently in.
        assert!(!t("< 300").holds(None, None));
    }

    #[test]
    fn malformed_tolerances_say_what_is_allowed() {
        for (bad, says) in [
            ("300", "must be `< N`"),
            ("< fast", "is not a number"),
            ("300..100", "from low to high"),
            ("~ (", "invalid regex"),
            ("1..x", "is not a number"),
        ] {
            let e = Tolerance::try_from(bad.to_string()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
