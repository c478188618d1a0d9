//! Any bytes as an uploaded `.npz`: `.npy` header parsing, and the whole unpack (zip members
//! capped while they expand, headers checked against their payload) plus the sample count, with
//! a 1 MiB expansion limit. Errors are fine; panics, hangs and writes past the limit are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelpress::eval::npz;

const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = npz::parse_header(&mut std::io::Cursor::new(data));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.npz");
    std::fs::write(&path, data).unwrap();
    let dest = dir.path().join("arrays");
    std::fs::create_dir(&dest).unwrap();
    if let Ok(arrays) = npz::unpack(&path, &dest, LIMIT) {
        let _ = npz::sample_count(&arrays);
        let written: u64 = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(written <= LIMIT + 4096 * arrays.len() as u64, "unpacked {written} bytes past the limit");
    }
});
