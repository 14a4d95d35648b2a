//! netem delay distribution tables, generated the way iproute2's `netem/normal.c`,
//! `pareto.c` and `paretonormal.c` generate the `.dist` files `tc` loads: 4,096 signed 16-bit
//! samples of the inverse CDF, scaled by NETEM_DIST_SCALE (8192). We compute them instead of
//! shipping iproute2's files, so the agent needs nothing on the node's filesystem.
use serde::{Deserialize, Serialize};

const TABLESIZE: usize = 16384;
const SCALE: f64 = 8192.0;
const PARETO_A: f64 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    Normal,
    Pareto,
    ParetoNormal,
}

impl std::str::FromStr for Distribution {
    type Err = crate::InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Distribution::Normal),
            "pareto" => Ok(Distribution::Pareto),
            "paretonormal" => Ok(Distribution::ParetoNormal),
            _ => Err(crate::invalid(
                "--distribution",
                format!("`{s}` must be normal, pareto or paretonormal"),
            )),
        }
    }
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
            Distribution::ParetoNormal => "paretonormal",
        }
    }

    pub fn table(self) -> Vec<i16> {
        match self {
            Distribution::Normal => {
                let inv = inverse_normal();
                (0..TABLESIZE)
                    .step_by(4)
                    .map(|i| (inv[i] * SCALE).round_ties_even() as i16)
                    .collect()
            }
            Distribution::Pareto => (0..TABLESIZE / 4).map(pareto).collect(),
            Distribution::ParetoNormal => {
                let inv = inverse_normal();
                (0..TABLESIZE)
                    .step_by(4)
                    .map(|i| {
                        let normal = (inv[i] * SCALE).round_ties_even() as i32;
                        let pareto = pareto(i / 4) as i32;
                        // C integer division truncates toward zero, as Rust's does.
                        ((normal + 3 * pareto) / 4) as i16
                    })
                    .collect()
            }
        }
    }
}

/// table[i] = x such that Phi(x) ~ i / TABLESIZE, by sweeping x as the C code does (the same
/// float accumulation, so the same values).
fn inverse_normal() -> Vec<f64> {
    let mut table = vec![0.0f64; TABLESIZE + 1];
    let mut x = -10.0f64;
    while x < 10.05 {
        let cdf = 0.5 + 0.5 * libm::erf(x / std::f64::consts::SQRT_2);
        let i = (TABLESIZE as f64 * cdf).round_ties_even() as usize;
        if i <= TABLESIZE {
            table[i] = x;
        }
        x += 0.00005;
    }
    table
}

/// The n-th of 4,096 pareto samples (shape 3), shifted and scaled as iproute2 does.
fn pareto(n: usize) -> i16 {
    let i = 65536 - 16 * n as i64;
    let mut v = 1.0 / (i as f64 / 65536.0).powf(1.0 / PARETO_A);
    v -= 1.5;
    v *= (4.0 / 3.0) * SCALE;
    v.min(32767.0).round_ties_even() as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compares with the tables Debian's iproute2 ships. Needs iproute2 installed (the test
    /// scripts install it); says so rather than pass without it.
    #[test]
    fn tables_match_iproute2() {
        let dirs = [
            "/usr/lib/x86_64-linux-gnu/tc",
            "/usr/lib/aarch64-linux-gnu/tc",
            "/usr/lib/tc",
            "/usr/share/tc",
        ];
        for (name, dist) in [
            ("normal", Distribution::Normal),
            ("pareto", Distribution::Pareto),
            ("paretonormal", Distribution::ParetoNormal),
        ] {
            let path = dirs
                .iter()
                .map(|d| std::path::Path::new(d).join(format!("{name}.dist")))
                .find(|p| p.exists())
                .unwrap_or_else(|| {
                    panic!("{name}.dist not found in {dirs:?}: install iproute2 to run this test")
                });
            let text = std::fs::read_to_string(&path).expect("read dist");
            let want: Vec<i32> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .flat_map(|l| {
                    l.split_whitespace()
                        .map(|v| v.parse::<i32>().expect("number"))
                })
                .collect();
            let have = dist.table();
            assert_eq!(have.len(), want.len(), "{name}: table size");
            let differ = have
                .iter()
                .zip(&want)
                .filter(|(h, w)| **h as i32 != **w)
                .count();
            let worst = have
                .iter()
                .zip(&want)
                .map(|(h, w)| (*h as i32 - *w).abs())
                .max()
                .unwrap_or(0);
            // libm's erf and glibc's may differ in the last bit, which can move a rounding.
            assert!(
                worst <= 1 && differ <= 8,
                "{name}: {differ} values differ, worst by {worst}"
            );
        }
    }
}
