//! The fuzz targets in CI: each replays its committed corpus
//! (`fuzz/corpus/<target>/`), then runs mutations of it for a few seconds
//! (`OTAKO_FUZZ_SECS`, default 2). Not coverage-guided: the long runs are
//! libFuzzer's, through `scripts/fuzz.sh`. A failing input is written to
//! `target/fuzz-failures/` and named in the panic, ready to become a
//! corpus file (a regression test) once fixed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use otako_gateway::fuzz::Target;

/// Fragments that parsers treat specially, spliced in by the mutator.
const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"{",
    b"}",
    b"\"",
    b":",
    b",",
    b"[",
    b"]",
    b"\\u0000",
    b"null",
    b"-1",
    b"0",
    b"18446744073709551616",
    b"1e999",
    b".",
    b"=",
    b"&",
    b"%",
    b"\xff",
    b"\xf0\x9f\x98\x80",
    b"\x81\x80",
    b"\x89\xfe\xff\xff",
    b"\x88\xff",
];

/// xorshift64*: deterministic per seed, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus(target: Target) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target.name());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("corpus file");
            (path, bytes)
        })
        .collect()
}

fn mutate(rng: &mut Rng, seeds: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => data.insert(at, rng.next() as u8),
            3 if at < data.len() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            4 if at < data.len() => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                let copy = data[at..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, copy);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                data.splice(at..at, piece.iter().copied());
            }
        }
    }
    data
}

fn fails(target: Target, data: &[u8]) -> bool {
    catch_unwind(AssertUnwindSafe(|| target.run(data))).is_err()
}

fn record_failure(target: Target, data: &[u8], origin: &str) -> ! {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{}-{:016x}", target.name(), fnv(data)));
    let _ = std::fs::write(&file, data);
    panic!(
        "fuzz target {} failed on {origin}; the input is in {} ({} bytes: {:?})",
        target.name(),
        file.display(),
        data.len(),
        String::from_utf8_lossy(&data[..data.len().min(200)])
    );
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn run(target: Target) {
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "{} has no corpus", target.name());
    for (path, data) in &seeds {
        if fails(target, data) {
            record_failure(target, data, &path.display().to_string());
        }
    }
    let budget = std::env::var("OTAKO_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs_f64);
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < budget {
        let data = mutate(&mut rng, &seeds);
        if fails(target, &data) {
            record_failure(target, &data, &format!("a mutation (rng seed {seed})"));
        }
        runs += 1;
    }
    eprintln!(
        "{}: {} corpus inputs, {runs} mutations in {:.1} s",
        target.name(),
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn dispatch_frame() {
    run(Target::DispatchFrame);
}

#[test]
fn token() {
    run(Target::Token);
}

#[test]
fn handshake() {
    run(Target::Handshake);
}

#[test]
fn inbound_frames() {
    run(Target::InboundFrames);
}

#[test]
fn config() {
    run(Target::Config);
}

#[test]
fn plugin_output() {
    run(Target::PluginOutput);
}

/// Every target has a test above and a libFuzzer binary in `fuzz/`.
#[test]
fn every_target_is_driven() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    for target in Target::ALL {
        assert!(
            manifest.contains(&format!("name = \"{}\"", target.name())),
            "fuzz/Cargo.toml has no binary for {}",
            target.name()
        );
    }
}
