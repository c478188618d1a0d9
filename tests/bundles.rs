//! Models with external data, uploaded as bundles (.zip, .tar, multipart), and the hostile ones:
//! traversal in external-data locations, symlinks, ranges past the end, zip bombs.

mod common;

use std::io::Write;

use common::{TestApp, assert_error};
use modelpress::onnx::{self, builder, external};
use serde_json::{Value, json};
use sqlx::PgPool;

const PARAMETERS: u64 = 16 * 32 + 32 + 32 * 10 + 10;

/// The tiny MLP saved with every tensor of 64 bytes or more in `m.onnx.data`: (model, data).
fn external_mlp(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    external::save(&builder::tiny_mlp(seed), &path, Some(64)).unwrap();
    (
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.path().join("m.onnx.data")).unwrap(),
    )
}

/// The tiny MLP whose first weight claims to live at `location`, bytes `offset..offset+length`.
fn mlp_pointing_at(location: &str, offset: u64, length: u64) -> Vec<u8> {
    let mut model = builder::tiny_mlp(1);
    external::point_to(
        &mut model.graph.as_mut().unwrap().initializer[0],
        location,
        offset,
        length,
    );
    onnx::encode(&model)
}

fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in files {
        zip.start_file(*name, options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn tar_of(files: &[(&str, &[u8])], symlink: Option<(&str, &str)>) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, *data).unwrap();
    }
    if let Some((name, target)) = symlink {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        tar.append_link(&mut header, name, target).unwrap();
    }
    tar.into_inner().unwrap()
}

async fn post(app: &TestApp, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    app.client
        .post(app.url("/v1/models"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_zip_bundle_with_external_data_uploads_and_compresses(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (model, data) = external_mlp(21);
    let r = post(
        &app,
        "application/zip",
        zip_of(&[("m.onnx", &model), ("m.onnx.data", &data)]),
    )
    .await;
    assert_eq!(r.status(), 201);
    let uploaded: Value = r.json().await.unwrap();
    assert_eq!(uploaded["name"], "m.onnx");
    assert_eq!(uploaded["summary"]["parameters"], PARAMETERS);
    assert_eq!(uploaded["files"][0]["path"], "m.onnx.data");
    assert_eq!(uploaded["files"][0]["size_bytes"], data.len());
    assert_eq!(uploaded["size_bytes"], model.len() + data.len());

    let job = app
        .submit_ok(uploaded["id"].as_str().unwrap(), json!([{"pass": "optimize"}]))
        .await;
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let report: Value = app
        .get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["result"]["parameters"], PARAMETERS);
    assert!(report["result"]["fidelity"]["max_abs_error"].as_f64().unwrap() < 1e-4);
    app.stop().await;
}

#[sqlx::test]
async fn tar_and_multipart_bundles_upload_too(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let (model, data) = external_mlp(22);

    let r = post(
        &app,
        "application/x-tar",
        tar_of(&[("dir/m.onnx", &model), ("dir/m.onnx.data", &data)], None),
    )
    .await;
    assert_eq!(r.status(), 201);
    let uploaded: Value = r.json().await.unwrap();
    // The bundle comes back as uploaded: the .onnx from /content, each data file from /files.
    let id = uploaded["id"].as_str().unwrap();
    let content = app
        .get(&format!("/v1/models/{id}/content"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(content.to_vec(), model);
    let file = app
        .get(&format!("/v1/models/{id}/files/m.onnx.data"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(file.to_vec(), data);
    assert_error(
        app.get(&format!("/v1/models/{id}/files/other.bin")).await,
        404,
        "not_found",
    )
    .await;

    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(model.clone()).file_name("mlp.onnx"),
        )
        .part(
            "data",
            reqwest::multipart::Part::bytes(data.clone()).file_name("m.onnx.data"),
        );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let uploaded: Value = r.json().await.unwrap();
    assert_eq!(uploaded["name"], "mlp.onnx");
    assert_eq!(uploaded["files"].as_array().unwrap().len(), 1);

    // The model alone, without its data file: the reference cannot be satisfied.
    let message = assert_error(app.upload(model).await, 400, "invalid_model").await;
    assert!(
        message.contains("m.onnx.data") && message.contains("not there"),
        "{message}"
    );
}

#[sqlx::test]
async fn traversal_in_external_data_locations_is_refused_and_nothing_is_stored(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let w1_bytes = 16 * 32 * 4;
    let cases = [
        (mlp_pointing_at("../../../etc/passwd", 0, w1_bytes), "'..'"),
        (mlp_pointing_at("/etc/passwd", 0, w1_bytes), "absolute"),
        (mlp_pointing_at("C:\\Windows\\win.ini", 0, w1_bytes), "backslash"),
    ];
    for (model, expected) in cases {
        let message = assert_error(app.upload(model).await, 400, "invalid_model").await;
        assert!(message.contains(expected) && message.contains("\"w1\""), "{message}");
    }

    // A bundle whose data file is a symlink to a file outside it.
    let model = mlp_pointing_at("w.bin", 0, w1_bytes);
    let bundle = tar_of(&[("m.onnx", &model)], Some(("w.bin", "/etc/passwd")));
    let message = assert_error(post(&app, "application/x-tar", bundle).await, 400, "invalid_model").await;
    assert!(message.contains("Symlink"), "{message}");

    // A bundle whose archive entry climbs out of the folder (zip slip).
    let bundle = zip_of(&[("m.onnx", &model), ("../w.bin", &[0u8; 2048])]);
    assert_error(post(&app, "application/zip", bundle).await, 400, "invalid_model").await;

    // A range past the end of the data file.
    let model = mlp_pointing_at("w.bin", 1024, w1_bytes);
    let bundle = zip_of(&[("m.onnx", &model), ("w.bin", &[0u8; 2048])]);
    let message = assert_error(post(&app, "application/zip", bundle).await, 400, "invalid_model").await;
    assert!(message.contains("past the end"), "{message}");

    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
    let models: Value = app.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["items"], json!([]));
}

#[sqlx::test]
async fn a_zip_bomb_is_refused_while_it_expands(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| c.limits.max_model_bytes = 1 << 20).await;
    let bomb = zip_of(&[("m.onnx", &vec![0u8; 64 << 20])]);
    assert!(bomb.len() < 1 << 20, "the archive fits under the limit");
    let message = assert_error(post(&app, "application/zip", bomb).await, 400, "invalid_model").await;
    assert!(message.contains("limit"), "{message}");
    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
}

#[sqlx::test]
async fn a_bundle_needs_exactly_one_model(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let m = common::tiny_mlp_bytes(1);
    let message = assert_error(
        post(&app, "application/zip", zip_of(&[("a.onnx", &m), ("b.onnx", &m)])).await,
        400,
        "invalid_model",
    )
    .await;
    assert!(message.contains("2 .onnx files"), "{message}");
    assert_error(
        post(&app, "application/zip", zip_of(&[("readme.txt", b"hi")])).await,
        400,
        "invalid_model",
    )
    .await;
    assert_error(
        post(&app, "application/zip", b"PK not really".to_vec()).await,
        400,
        "invalid_model",
    )
    .await;
}

#[sqlx::test]
async fn declared_sizes_that_do_not_match_the_data_are_refused(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let mut model = builder::tiny_mlp(1);
    model.graph.as_mut().unwrap().initializer[0].dims = vec![16, 33];
    let message = assert_error(app.upload(onnx::encode(&model)).await, 400, "invalid_model").await;
    assert!(
        message.contains("\"w1\"") && message.contains("2048 bytes"),
        "{message}"
    );
    model.graph.as_mut().unwrap().initializer[0].dims = vec![1 << 31, 1 << 31, 1 << 20];
    let message = assert_error(app.upload(onnx::encode(&model)).await, 400, "invalid_model").await;
    assert!(message.contains("absurd"), "{message}");
}
