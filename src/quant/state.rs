//! The description of a quantized tensor and bitsandbytes' serialized layout: the
//! `quant_state` JSON object and the tensor keys next to the packed weight.

use serde_json::{Map, Value};

use super::blockwise::{
    self, check_blocksize, double_quant, num_blocks, packed_len, NestedScales, NESTED_BLOCKSIZE,
};
use super::codebook::QuantType;
use crate::{Error, Result};

/// Original dtypes a quantized weight may come from (bitsandbytes' `dtype` field).
pub const DTYPES: [&str; 3] = ["float32", "float16", "bfloat16"];

/// Everything but the tensors: what bitsandbytes keeps in its `quant_state` JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per block (power of two, 32..=4096).
    pub blocksize: usize,
    /// Original dtype name (`"bfloat16"`, `"float16"`, `"float32"`).
    pub dtype: String,
    /// Original shape.
    pub shape: Vec<usize>,
    /// Present when the scales are double-quantized: `(nested_blocksize, nested_offset)`.
    pub nested: Option<(usize, f32)>,
}

impl QuantState {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of blocks (= number of scales).
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.numel(), self.blocksize)
    }

    /// Parse bitsandbytes' `quant_state` JSON; every problem is a [`Error::QuantFormat`].
    pub fn from_json(raw: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::QuantFormat(format!("quant_state JSON: {m}"));
        let text = std::str::from_utf8(raw).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON ({e})")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let get = |k: &str| obj.get(k).ok_or_else(|| bad(format!("missing key {k:?}")));
        let uint = |k: &str| -> Result<usize> {
            get(k)?
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("{k:?} must be a non-negative integer")))
        };
        let qt_name = get("quant_type")?
            .as_str()
            .ok_or_else(|| bad("\"quant_type\" must be a string".into()))?;
        let quant_type = QuantType::parse(qt_name)?;
        let blocksize = uint("blocksize")?;
        check_blocksize(blocksize)?;
        let dtype = get("dtype")?
            .as_str()
            .ok_or_else(|| bad("\"dtype\" must be a string".into()))?;
        if !DTYPES.contains(&dtype) {
            return Err(bad(format!(
                "unsupported dtype {dtype:?}; expected one of {DTYPES:?}"
            )));
        }
        let shape = get("shape")?
            .as_array()
            .ok_or_else(|| bad("\"shape\" must be a list".into()))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| bad(format!("bad dimension {d} in \"shape\"")))
            })
            .collect::<Result<Vec<_>>>()?;
        let present: Vec<&str> = ["nested_blocksize", "nested_dtype", "nested_offset"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        let nested = match present.len() {
            0 => None,
            3 => {
                let nb = uint("nested_blocksize")?;
                if nb != NESTED_BLOCKSIZE {
                    return Err(bad(format!(
                        "nested_blocksize {nb} not supported (bitsandbytes uses {NESTED_BLOCKSIZE})"
                    )));
                }
                if get("nested_dtype")?.as_str() != Some("float32") {
                    return Err(bad("\"nested_dtype\" must be \"float32\"".into()));
                }
                let off = get("nested_offset")?
                    .as_f64()
                    .ok_or_else(|| bad("\"nested_offset\" must be a number".into()))?;
                Some((nb, off as f32))
            }
            _ => {
                return Err(bad(format!(
                    "incomplete nested statistics: have {present:?}, need nested_blocksize, nested_dtype and nested_offset"
                )))
            }
        };
        Ok(QuantState {
            quant_type,
            blocksize,
            dtype: dtype.to_string(),
            shape,
            nested,
        })
    }

    /// The JSON bytes bitsandbytes writes (Python `json.dumps` spacing and float repr).
    pub fn to_json(&self) -> Vec<u8> {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        // Strings go through serde_json so any dtype text is escaped (a quote cannot end the
        // string early); the layout around them is Python's `json.dumps` one.
        let string = |v: &str| serde_json::to_string(v).expect("a str always serializes");
        let mut s = format!(
            "{{\"quant_type\": {}, \"blocksize\": {}, \"dtype\": {}, \"shape\": [{}]",
            string(self.quant_type.name()),
            self.blocksize,
            string(&self.dtype),
            shape.join(", ")
        );
        if let Some((nb, off)) = self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {nb}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(off as f64)
            ));
        }
        s.push('}');
        s.into_bytes()
    }

    /// Parsed JSON as a `serde_json` map (for bindings that want a dict).
    pub fn to_value(&self) -> Map<String, Value> {
        let v: Value = serde_json::from_slice(&self.to_json()).expect("we emit valid JSON");
        match v {
            Value::Object(m) => m,
            _ => unreachable!("to_json emits an object"),
        }
    }
}

/// Format a float the way Python's `repr` does: shortest round-trip digits, scientific notation
/// when the exponent is below -4 or at least 16.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}"); // e.g. "-1.5e-7", shortest round-trip digits
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if neg { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let es = if exp < 0 { "-" } else { "+" };
        return format!("{sign}{m}e{es}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        format!("{sign}0.{}{}", "0".repeat((-point) as usize), digits)
    } else if (point as usize) >= digits.len() {
        format!(
            "{sign}{}{}.0",
            digits,
            "0".repeat(point as usize - digits.len())
        )
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{sign}{a}.{b}")
    }
}

/// bitsandbytes' key suffixes of a serialized 4-bit weight `P.weight` (each key is
/// `P.weight` + suffix; the packed bytes themselves sit at `P.weight`).
pub fn bnb_key_suffixes(qt: QuantType, nested: bool) -> Vec<String> {
    let mut v = vec![".absmax".to_string(), ".quant_map".to_string()];
    if nested {
        v.push(".nested_absmax".into());
        v.push(".nested_quant_map".into());
    }
    v.push(format!(".quant_state.bitsandbytes__{}", qt.name()));
    v
}

/// Block scales of a quantized tensor: plain float32, or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One float32 absmax per block.
    Plain(Vec<f32>),
    /// 8-bit codes + nested float32 scales + offset.
    Nested(NestedScales),
}

/// A 4-bit tensor held in host memory: packed codes, scales and the state. (GPU copies are
/// torch tensors owned by Python; this type is the CPU-side format owner.)
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    /// `ceil(n/2)` bytes, first element in the high nibble.
    pub packed: Vec<u8>,
    /// Block scales.
    pub scales: Scales,
    /// Type, blocksize, dtype, shape (and nested facts mirrored from `scales`).
    pub state: QuantState,
}

impl QuantizedTensor {
    /// Quantize a float32 tensor of `shape` (`dtype` names its original dtype).
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        dtype: &str,
        blocksize: usize,
        qt: QuantType,
        double: bool,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::invalid(format!(
                "shape {shape:?} has {n} elements but the data has {}",
                data.len()
            )));
        }
        if !DTYPES.contains(&dtype) {
            return Err(Error::invalid(format!("unsupported dtype {dtype:?}")));
        }
        check_blocksize(blocksize)?;
        let mut packed = vec![0u8; packed_len(n)];
        let mut absmax = vec![0f32; num_blocks(n, blocksize)];
        blockwise::quantize_4bit(data, blocksize, qt, &mut packed, &mut absmax)?;
        let (scales, nested) = if double {
            let s = double_quant(&absmax);
            let off = s.offset;
            (Scales::Nested(s), Some((NESTED_BLOCKSIZE, off)))
        } else {
            (Scales::Plain(absmax), None)
        };
        Ok(QuantizedTensor {
            packed,
            scales,
            state: QuantState {
                quant_type: qt,
                blocksize,
                dtype: dtype.to_string(),
                shape: shape.to_vec(),
                nested,
            },
        })
    }

    /// The float32 per-block scales (undoing double quantization).
    pub fn block_scales(&self) -> Vec<f32> {
        match &self.scales {
            Scales::Plain(a) => a.clone(),
            Scales::Nested(s) => {
                let mut out = vec![0f32; s.codes.len()];
                blockwise::dequant_scales(&s.codes, &s.nested_absmax, s.offset, &mut out)
                    .expect("consistent by construction");
                out
            }
        }
    }

    /// Dequantize to float32 (row-major, `state.shape`).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.state.numel()];
        blockwise::dequantize_4bit(
            &self.packed,
            &self.block_scales(),
            self.state.blocksize,
            self.state.quant_type,
            &mut out,
        )?;
        Ok(out)
    }
}
