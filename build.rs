//! Generates the ONNX protobuf types from `proto/onnx.proto` with a pure-Rust protobuf compiler
//! (protox), so building needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    // `bytes` fields (tensor raw_data above all) as `bytes::Bytes`: decoding from a `Bytes` buffer then
    // shares it instead of copying every weight, so a model costs its size in memory once, not twice.
    // Derived with `crate::onnx::wire`: prost with block copies for packed float data (see there).
    prost_build::Config::new()
        .bytes(["."])
        .prost_path("crate::onnx::wire")
        .compile_fds(descriptors)?;
    Ok(())
}
