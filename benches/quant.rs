//! Criterion bench of the CPU NF4 path: quantize and dequantize a 4096x4096 float32 weight
//! (blocksize 64), and double quantization of its scales.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rslora_fast::quant::{
    dequantize_4bit, double_quant, num_blocks, packed_len, quantize_4bit, QuantType,
};

fn data(n: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let n = 4096 * 4096;
    let bs = 64;
    let x = data(n);
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, bs)];
    let mut out = vec![0f32; n];
    let mut g = c.benchmark_group("nf4_cpu_4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("quantize", |b| {
        b.iter(|| quantize_4bit(&x, bs, QuantType::Nf4, &mut packed, &mut absmax).unwrap())
    });
    g.bench_function("dequantize", |b| {
        b.iter(|| dequantize_4bit(&packed, &absmax, bs, QuantType::Nf4, &mut out).unwrap())
    });
    g.bench_function("double_quant", |b| b.iter(|| double_quant(&absmax)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
