//! The `prost` the generated ONNX types are derived with (build.rs sets it as their `prost_path`):
//! prost itself, except that `float` and `double` fields decode and encode their packed data as one
//! block instead of one value at a time.
//!
//! Why: older exporters (PaddlePaddle's, among them PP-OCR's classifier) store weights in
//! `TensorProto.float_data`, a packed `repeated float`. prost reads and writes such a field a value
//! at a time through `Buf`/`BufMut`, about 5 ns per weight: decoding PP-OCR cls (134k floats in 254
//! `Constant` nodes) took 0.66 ms, most of a weight-only pass on it. Packed fixed-width values are
//! their little-endian bytes back to back, so a block copy decodes them exactly. Anything else (the
//! unpacked encoding proto2 readers must also accept, a length that is not a whole number of values,
//! data split across buffer chunks) goes to prost's own code, errors included.

pub use prost::*;

#[doc(hidden)]
pub mod encoding {
    pub use prost::encoding::*;

    /// Packed fixed-width numbers: `$ty` and its width in bytes.
    macro_rules! block_packed {
        ($module:ident, $ty:ty, $width:expr) => {
            pub mod $module {
                use prost::bytes::{Buf, BufMut};
                pub use prost::encoding::$module::*;
                use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint};

                pub fn merge_repeated(
                    wire_type: WireType,
                    values: &mut Vec<$ty>,
                    buf: &mut impl Buf,
                    ctx: DecodeContext,
                ) -> Result<(), prost::DecodeError> {
                    if wire_type == WireType::LengthDelimited
                        && let Some((header, payload)) = super::whole_payload(buf.chunk(), $width)
                    {
                        values.extend(
                            payload
                                .chunks_exact($width)
                                .map(|b| <$ty>::from_le_bytes(b.try_into().expect("chunks of the width"))),
                        );
                        buf.advance(header + payload.len());
                        return Ok(());
                    }
                    prost::encoding::$module::merge_repeated(wire_type, values, buf, ctx)
                }

                pub fn encode_packed(tag: u32, values: &[$ty], buf: &mut impl BufMut) {
                    if values.is_empty() {
                        return;
                    }
                    encode_key(tag, WireType::LengthDelimited, buf);
                    encode_varint((values.len() * $width) as u64, buf);
                    // Bounded stack blocks: no allocation the size of the tensor.
                    let mut block = [0u8; 4096];
                    for part in values.chunks(4096 / $width) {
                        for (out, v) in block.chunks_exact_mut($width).zip(part) {
                            out.copy_from_slice(&v.to_le_bytes());
                        }
                        buf.put_slice(&block[..part.len() * $width]);
                    }
                }
            }
        };
    }

    block_packed!(float, f32, 4);
    block_packed!(double, f64, 8);

    /// A length-delimited field at the start of `chunk`: (the length prefix's size, the payload),
    /// when the whole payload is in `chunk` and is a whole number of `width`-byte values.
    fn whole_payload(chunk: &[u8], width: usize) -> Option<(usize, &[u8])> {
        let mut rest = chunk;
        let len = usize::try_from(decode_varint(&mut rest).ok()?).ok()?;
        let header = chunk.len() - rest.len();
        (len % width == 0 && len <= rest.len()).then(|| (header, &rest[..len]))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost::bytes::Buf;

    use crate::onnx::proto::TensorProto;

    /// Values whose bit patterns must survive: signed zero, subnormals, infinities, a NaN payload.
    fn awkward_floats() -> Vec<f32> {
        let mut v: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        v.extend([
            -0.0,
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7fc0_1234),
        ]);
        v
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Field 4 (`float_data`) as prost's own value-at-a-time code writes it, packed.
    fn prost_packed(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::float::encode_packed(4, values, &mut out);
        out
    }

    #[test]
    fn packed_floats_encode_as_prost_does_and_decode_bit_for_bit() {
        let values = awkward_floats();
        let t = TensorProto {
            float_data: values.clone(),
            double_data: values.iter().map(|&f| f64::from(f) * 1e-3).collect(),
            ..Default::default()
        };
        let bytes = t.encode_to_vec();
        let mut expected = prost_packed(&values);
        prost::encoding::double::encode_packed(10, &t.double_data, &mut expected);
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), t.encoded_len());
        let back = TensorProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(bits(&back.float_data), bits(&values));
        assert_eq!(
            back.double_data.iter().map(|d| d.to_bits()).collect::<Vec<_>>(),
            t.double_data.iter().map(|d| d.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn unpacked_split_and_repeated_encodings_still_decode() {
        let values = awkward_floats();
        // Unpacked: one key (field 4, wire type 5) per value, as proto2 readers must also accept.
        let mut unpacked = Vec::new();
        for v in &values {
            unpacked.push((4 << 3) | 5);
            unpacked.extend(v.to_le_bytes());
        }
        assert_eq!(
            bits(&TensorProto::decode(unpacked.as_slice()).unwrap().float_data),
            bits(&values)
        );
        // Two packed runs of the same field concatenate.
        let (a, b) = values.split_at(333);
        let twice = [prost_packed(a), prost_packed(b)].concat();
        assert_eq!(
            bits(&TensorProto::decode(twice.as_slice()).unwrap().float_data),
            bits(&values)
        );
        // A buffer in two chunks, split inside a value: prost's own path reads across the seam.
        let packed = prost_packed(&values);
        for cut in [1, 2, 7, packed.len() / 2 + 1, packed.len() - 2] {
            let chained = packed[..cut].chain(&packed[cut..]);
            assert_eq!(
                bits(&TensorProto::decode(chained).unwrap().float_data),
                bits(&values),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn packed_floats_of_a_wrong_or_truncated_length_are_refused() {
        let mut ragged = vec![(4 << 3) | 2, 6];
        ragged.extend([0u8; 6]);
        assert!(
            TensorProto::decode(ragged.as_slice()).is_err(),
            "6 bytes are not whole floats"
        );
        let packed = prost_packed(&awkward_floats());
        for len in [1, 2, 3, packed.len() - 1] {
            assert!(TensorProto::decode(&packed[..len]).is_err(), "cut to {len} bytes");
        }
    }
}
