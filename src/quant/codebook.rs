//! The code tables: NF4 and FP4 (16 values each) and the signed 8-bit dynamic map used for
//! double quantization, plus the exact encoders bitsandbytes uses for each.

use crate::{Error, Result};

/// Which 4-bit code table a tensor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 (QLoRA): 16 quantiles of a normal distribution scaled to [-1, 1].
    Nf4,
    /// bitsandbytes' FP4 (1 sign bit, magnitudes `{0, 0.0625, 8, 12, 4, 6, 2, 3} / 12`).
    Fp4,
}

impl QuantType {
    /// Parse `"nf4"` / `"fp4"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::QuantFormat(format!(
                "unknown 4-bit quant type {other:?}; expected \"nf4\" or \"fp4\""
            ))),
        }
    }

    /// The lowercase name used in bitsandbytes' JSON and key suffix.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 code values, index = 4-bit code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// The code a padding element (value 0.0) gets: 7 for NF4, 0 for FP4.
    pub fn zero_code(self) -> u8 {
        self.encoder().encode(0.0)
    }

    /// The encoder (sorted midpoints and order) of this table.
    pub fn encoder(self) -> &'static Encoder4 {
        match self {
            QuantType::Nf4 => &NF4_ENCODER,
            QuantType::Fp4 => &FP4_ENCODER,
        }
    }
}

/// NF4 code values (float32).
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 code values: bit 3 is the sign; codes 0 and 8 are +0 and -0.
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// Ascending order of the FP4 codes. The two zeros keep index order (+0 then -0), as
/// bitsandbytes sorts them, so values in `(0, first positive midpoint]` encode as code 8.
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];
const NF4_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Nearest-code encoder of a 16-value table: 15 float32 midpoints of the sorted codes and the
/// code index of each sorted slot. `x > t` picks the upper slot (ties go to the lower one).
#[derive(Debug)]
pub struct Encoder4 {
    /// Midpoints `(s[i] + s[i+1]) / 2` in float32 of the sorted codes `s`.
    pub midpoints: [f32; 15],
    /// `order[slot]` = code index of the `slot`-th smallest code.
    pub order: [u8; 16],
}

impl Encoder4 {
    const fn new(code: &[f32; 16], order: [u8; 16]) -> Self {
        let mut midpoints = [0.0f32; 15];
        let mut i = 0;
        while i < 15 {
            let a = code[order[i] as usize];
            let b = code[order[i + 1] as usize];
            midpoints[i] = (a + b) / 2.0;
            i += 1;
        }
        Encoder4 { midpoints, order }
    }

    /// Code of a normalized value (already clamped to [-1, 1]).
    #[inline]
    pub fn encode(&self, x: f32) -> u8 {
        // NaN takes the last code of the order (above every midpoint), as bitsandbytes encodes it.
        if x.is_nan() {
            return self.order[self.order.len() - 1];
        }
        // Count of midpoints strictly below x; branch-free so the loop vectorizes.
        let mut slot = 0u8;
        for &t in &self.midpoints {
            slot += (x > t) as u8;
        }
        self.order[slot as usize]
    }
}

static NF4_ENCODER: Encoder4 = Encoder4::new(&NF4, NF4_ORDER);
static FP4_ENCODER: Encoder4 = Encoder4::new(&FP4, FP4_ORDER);

/// The signed 8-bit dynamic map: 256 sorted float32 values from -0.99296875 to 1.0 with one 0.0
/// at index 127 (bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`).
///
/// Definition: for each exponent step `i` in 0..7, take the `2^i + 1` evenly spaced float32
/// points of [0.1, 1], average neighbours, scale by `10^(i-6)`, and keep both signs; add 0
/// and 1. The points use torch.linspace's float32 arithmetic (`start + step * j` as one fused
/// multiply-add for the lower half, `end - step * (k-1-j)` for the upper): that is what
/// makes the float32 values agree with bitsandbytes bit for bit.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut vals = Vec::with_capacity(256);
        for i in 0..7i32 {
            let k = (1usize << i) + 1;
            let (start, end) = (0.1f32, 1.0f32);
            let step = (end - start) / (k - 1) as f32;
            let pts: Vec<f32> = (0..k)
                .map(|j| {
                    if j < k / 2 {
                        step.mul_add(j as f32, start)
                    } else {
                        (-step).mul_add((k - 1 - j) as f32, end)
                    }
                })
                .collect();
            let scale = 10f64.powi(i - 6) as f32;
            for w in pts.windows(2) {
                let m = (w[0] + w[1]) / 2.0;
                vals.push(m * scale);
                vals.push(-(m * scale));
            }
        }
        vals.push(0.0);
        vals.push(1.0);
        vals.sort_by(|a, b| a.total_cmp(b));
        let mut out = [0f32; 256];
        out.copy_from_slice(&vals);
        out
    })
}

/// Number of points of the 8-bit lookup table (bitsandbytes' CPU blockwise quantizer).
pub const LUT8_SIZE: usize = 65536;

/// bitsandbytes' CPU encoder for the 8-bit dynamic map: [-1, 1] is cut into 65536 evenly
/// spaced points `-1 + 2i/65535`; each point maps to the count of float32 midpoints of the
/// map strictly below it; a value `v` looks up point `trunc(((v + 1) * 0.5) * 65535 + 0.5)`.
/// Slightly coarser than a true nearest search near midpoints, which is why we copy it.
pub fn dynamic_lut() -> &'static [u8] {
    static LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map();
        let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; LUT8_SIZE];
        let mut c = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let v = -1.0f32 + (2.0f32 * i as f32) / (LUT8_SIZE - 1) as f32;
            while c < mids.len() && mids[c] < v {
                c += 1;
            }
            *slot = c as u8;
        }
        lut
    })
}

/// Encode one value with the 8-bit dynamic map the way [`dynamic_lut`] describes.
#[inline]
pub fn encode8(lut: &[u8], v: f32) -> u8 {
    let v = v.clamp(-1.0, 1.0);
    let idx = ((v + 1.0) * 0.5 * (LUT8_SIZE - 1) as f32 + 0.5) as usize;
    lut[idx.min(LUT8_SIZE - 1)]
}
