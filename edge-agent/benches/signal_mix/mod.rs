//! Readings shaped like the demo's simulated press (`edge_agent::simulator`), for the batch
//! benchmarks: per device `oil_temp` and `coolant_temp` (f32 registers, slow sines with
//! noise), `pressure` (u16 × 0.01 bar), `part_count` (a u32 counter) and `motor_current`
//! (i16 × 0.1 A with rare spikes), sampled once a second, with the odd bad reading. Generated
//! from a fixed seed, never checked in.

use std::f64::consts::TAU;

use edge_agent::Reading;
use edge_agent::contract::Quality;

/// `ticks` polls of `devices` presses: `ticks * devices * 5` readings in poll order.
pub(crate) fn readings(devices: usize, ticks: usize) -> Vec<Reading> {
    let mut noise = Noise(0x2545_F491_4F6C_DD1D);
    let mut out = Vec::with_capacity(devices * ticks * 5);
    let mut parts = vec![65_530u32; devices];
    for tick in 0..ticks {
        #[allow(clippy::cast_precision_loss)]
        let t = tick as f64;
        let ts_us = 1_700_000_000_000_000 + i64::try_from(tick).unwrap() * 1_000_000;
        for (d, count) in parts.iter_mut().enumerate() {
            // The temperatures are f32 registers: the value carries f32 precision.
            #[allow(clippy::cast_precision_loss)]
            let phase = d as f64;
            let device = format!("press-{}", d + 1);
            if noise.unit() < 0.7 {
                *count += 1;
            }
            let current = if noise.unit() < 0.01 {
                30.0 + 8.0 * noise.unit()
            } else {
                12.0 + 1.5 * (TAU * t / 40.0 + phase).sin() + 0.3 * noise.signed()
            };
            #[allow(clippy::cast_possible_truncation)]
            let values = [
                (
                    "oil_temp",
                    f64::from(
                        (70.0 + 6.0 * (TAU * t / 600.0 + phase).sin() + 0.4 * noise.signed())
                            as f32,
                    ),
                    "degC",
                ),
                (
                    "coolant_temp",
                    f64::from(
                        (66.0 + 4.0 * (TAU * t / 900.0 + phase).sin() + 0.4 * noise.signed())
                            as f32,
                    ),
                    "degC",
                ),
                (
                    "pressure",
                    (500.0 + 60.0 * (TAU * t / 120.0 + phase).sin() + 5.0 * noise.signed()).round()
                        * 0.01,
                    "bar",
                ),
                ("part_count", f64::from(*count), "parts"),
                ("motor_current", (current * 10.0).round() / 10.0, "A"),
            ];
            for (tag, value, unit) in values {
                let bad = noise.unit() < 0.001;
                out.push(Reading {
                    ts_us,
                    device: device.clone(),
                    tag: tag.to_owned(),
                    value: (!bad).then_some(value),
                    value_text: None,
                    quality: if bad { Quality::Bad } else { Quality::Good },
                    unit: Some(unit.to_owned()),
                });
            }
        }
    }
    out
}

/// xorshift64*: deterministic and cheap.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let x = (self.next() >> 11) as f64;
        x / (1u64 << 53) as f64
    }

    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f64 {
        self.unit() * 2.0 - 1.0
    }
}

/// The machine the figures come from, printed with them.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    format!("{} ({cpu}, {cores} cores)", std::env::consts::ARCH)
}
