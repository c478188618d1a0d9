//! Moving a large object to and from S3 holds a few parts in memory, never the whole file. Its
//! own test binary, so nothing else running in the process moves the peak it measures.

mod common;

use std::io::Write;

use common::moto::Moto;
use modelpress::storage::{MIN_PART_SIZE, S3Options, S3Storage, Storage};

/// Peak resident memory of this process so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
async fn a_96_mib_round_trip_through_s3_stays_far_below_the_file_size_in_memory() {
    const SIZE: usize = 96 << 20;
    let moto = Moto::start().await;
    moto.create_bucket("memory").await;
    let store = S3Storage::new(&S3Options {
        endpoint: moto.endpoint.clone(),
        bucket: "memory".into(),
        region: "us-east-1".into(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        allow_http: true,
        part_size: MIN_PART_SIZE,
        retry_timeout: std::time::Duration::from_secs(30),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    {
        // Written 1 MiB at a time, so the file never sits in this process's memory either.
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        for n in 0..SIZE >> 20 {
            f.write_all(&chunk[n..]).unwrap();
            f.write_all(&chunk[..n]).unwrap();
        }
    }
    let (size, sha) = modelpress::storage::hash_file(&src).await.unwrap();
    let before = peak_rss();

    store.put_file("big/object.bin", &src).await.unwrap();
    let back = dir.path().join("back");
    store.get_file("big/object.bin", &back).await.unwrap();

    let grew = peak_rss().saturating_sub(before);
    eprintln!(
        "96 MiB up in {} parts and back down: peak RSS grew {:.1} MiB",
        SIZE.div_ceil(MIN_PART_SIZE),
        grew as f64 / (1 << 20) as f64
    );
    assert_eq!(modelpress::storage::hash_file(&back).await.unwrap(), (size, sha));
    assert!(
        grew < (SIZE / 2) as u64,
        "peak RSS grew {grew} bytes moving a {SIZE}-byte file: it was buffered"
    );
}
