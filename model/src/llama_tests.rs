//! The forward pass against a naive dense implementation written here (no KV cache, no shared
//! ops), on a tiny seeded random model saved as an HF directory (config.json + safetensors).

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use vkv_vmm::KvLayout;

use super::*;
use vkv_kernels::cpu::KvDtype;

use vkv_kv::{KvCache, KvDims, KvManager, PagedKv, VmmKv, VmmShape};

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
  "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 256,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
}"#;

/// A random tensor, rounded to bf16 precision so that BF16 storage loses nothing.
fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

struct Tiny {
    dir: PathBuf,
    tensors: std::collections::HashMap<String, Vec<f32>>,
    /// Holds `dir`, removed with the model's files when the test drops it.
    _files: tempfile::TempDir,
}

/// Write the tiny model: MLP weights as BF16, everything else F32.
fn tiny_model(name: &str) -> Tiny {
    let files = tempfile::Builder::new()
        .prefix(&format!("vkv-tiny-llama-{name}-"))
        .tempdir()
        .unwrap();
    let dir = files.path().to_path_buf();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let (v, h, i, q, kv) = (97, 48, 80, 48, 16);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..3 {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![v, h]));
    let mut tensors = std::collections::HashMap::new();
    let mut bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values = if name.ends_with("norm.weight") {
            random(&mut rng, n, 0.5)
                .iter()
                .map(|x| 1.0 + x)
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect()
        } else {
            random(&mut rng, n, 0.3)
        };
        let (dtype, data) = if name.contains("mlp.") {
            (
                safetensors::Dtype::BF16,
                values
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            )
        } else {
            (
                safetensors::Dtype::F32,
                values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        bytes.push((name.clone(), dtype, shape, data));
        tensors.insert(name, values);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let file = safetensors::serialize(views, &None).unwrap();
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    Tiny {
        dir,
        tensors,
        _files: files,
    }
}

/// The dense reference: logits of every position of `tokens`, computed from scratch.
fn reference(t: &Tiny, tokens: &[u32]) -> Vec<Vec<f32>> {
    let w = |n: &str| &t.tensors[n];
    let (h, nh, nkv, hd, iw, vocab) = (48, 6, 2, 8, 80, 97);
    let lin = |x: &[f32], w: &[f32], out: usize| -> Vec<f32> {
        let k = x.len();
        (0..out)
            .map(|o| (0..k).map(|j| x[j] * w[o * k + j]).sum())
            .collect()
    };
    let norm = |x: &[f32], g: &[f32]| -> Vec<f32> {
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + 1e-5).sqrt();
        x.iter().zip(g).map(|(a, b)| a * r * b).collect()
    };
    let rope = |x: &mut [f32], pos: usize| {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let f = 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32);
                let (s, c) = (pos as f32 * f).sin_cos();
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * c - b * s;
                head[i + hd / 2] = a * s + b * c;
            }
        }
    };
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&tok| w("model.embed_tokens.weight")[tok as usize * h..][..h].to_vec())
        .collect();
    for l in 0..3 {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = norm(x, w(&p("input_layernorm")));
            let mut q = lin(&n, w(&p("self_attn.q_proj")), nh * hd);
            let mut k = lin(&n, w(&p("self_attn.k_proj")), nkv * hd);
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(lin(&n, w(&p("self_attn.v_proj")), nkv * hd));
        }
        for pos in 0..xs.len() {
            let mut att = vec![0f32; nh * hd];
            for head in 0..nh {
                let g = head / (nh / nkv);
                let scores: Vec<f32> = (0..=pos)
                    .map(|t| {
                        (0..hd)
                            .map(|d| qs[pos][head * hd + d] * ks[t][g * hd + d])
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    att[head * hd + d] = (0..=pos).map(|t| e[t] / z * vs[t][g * hd + d]).sum();
                }
            }
            let o = lin(&att, w(&p("self_attn.o_proj")), h);
            xs[pos].iter_mut().zip(o).for_each(|(x, o)| *x += o);
            let n = norm(&xs[pos], w(&p("post_attention_layernorm")));
            let g = lin(&n, w(&p("mlp.gate_proj")), iw);
            let u = lin(&n, w(&p("mlp.up_proj")), iw);
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = lin(&a, w(&p("mlp.down_proj")), h);
            xs[pos].iter_mut().zip(d).for_each(|(x, d)| *x += d);
        }
    }
    xs.iter()
        .map(|x| lin(&norm(x, w("model.norm.weight")), w("lm_head.weight"), vocab))
        .collect()
}

fn dims() -> KvDims {
    KvDims {
        num_layers: 3,
        num_kv_heads: 2,
        head_dim: 8,
    }
}

/// Every KV mode and layout in f32, f16 and FP8, each with the largest logit difference from
/// the dense f32 reference it may show (f16 rounds every K and V to 11 significant bits, FP8 to
/// 4).
fn caches() -> Vec<(Box<dyn KvCache>, f32)> {
    [KvDtype::F32, KvDtype::F16, KvDtype::Fp8]
        .into_iter()
        .flat_map(|d| {
            let tol = match d {
                KvDtype::F32 => 1e-4,
                KvDtype::F16 => F16_TOLERANCE,
                KvDtype::Fp8 => FP8_TOLERANCE,
            };
            let v: [Box<dyn KvCache>; 3] = [
                Box::new(PagedKv::with_dtype(dims(), d, 64, 16).unwrap()),
                Box::new(
                    VmmKv::with_dtype(
                        dims(),
                        d,
                        VmmShape::new(KvLayout::PerLayer, 8, 256, 4096, 256),
                    )
                    .unwrap(),
                ),
                Box::new(
                    VmmKv::with_dtype(
                        dims(),
                        d,
                        VmmShape::new(KvLayout::TokenMajor, 8, 256, 4096, 256),
                    )
                    .unwrap(),
                ),
            ];
            v.map(|c| (c, tol))
        })
        .collect()
}

/// Largest logit difference of the tiny model with an f16 KV cache from its f32 reference
/// (measured: 0.0087, logits up to 3.8; f16 keeps 11 significant bits of each K and V).
const F16_TOLERANCE: f32 = 0.02;

/// The same with an FP8 E4M3 cache (measured: 0.80; it keeps 4 significant bits, and this
/// model's K and V are uniform noise, which no scale helps).
const FP8_TOLERANCE: f32 = 1.2;

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < tol, "{what}: max abs error {err}");
}

fn prompt(seed: u64, n: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..97u32)).collect()
}

#[test]
fn prefill_logits_match_the_dense_reference_in_every_kv_mode() {
    let tiny = tiny_model("prefill");
    let model = Llama::from_hf_dir(&tiny.dir).unwrap();
    let tokens = prompt(1, 40); // crosses 16-token blocks and 4 KiB pages (64 tokens of 64 B)
    let want = reference(&tiny, &tokens);
    for (mut kv, tol) in caches() {
        let out = model
            .step(
                &[SeqChunk {
                    seq: 1,
                    tokens: &tokens,
                    start: 0,
                    all_logits: true,
                }],
                kv.as_mut(),
            )
            .unwrap();
        for (pos, want) in want.iter().enumerate() {
            close(
                &out[0][pos * 97..(pos + 1) * 97],
                want,
                tol,
                &format!("{} position {pos}", kv.name()),
            );
        }
    }
}

#[test]
fn chunked_prefill_and_decode_match_one_pass_and_batches_are_invariant() {
    let tiny = tiny_model("batch");
    let model = Llama::from_hf_dir(&tiny.dir).unwrap();
    let seqs: Vec<Vec<u32>> = (0..4)
        .map(|s| prompt(10 + s, [5, 33, 70, 18][s as usize]))
        .collect();
    let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|t| reference(&tiny, t)).collect();
    for (mut kv, tol) in caches() {
        // Step 1: prefill the first 3 tokens of every sequence, in one batch.
        // Then each step: sequence 0 decodes one token, the others prefill chunks of 7.
        let mut done = [0usize; 4];
        let mut step = 0;
        while done.iter().zip(&seqs).any(|(d, s)| d < &s.len()) {
            let chunks: Vec<SeqChunk<'_>> = (0..4)
                .filter(|&s| done[s] < seqs[s].len())
                .map(|s| {
                    let n = if step == 0 {
                        3
                    } else if s == 0 {
                        1
                    } else {
                        7
                    };
                    let end = (done[s] + n).min(seqs[s].len());
                    SeqChunk {
                        seq: s as u64,
                        tokens: &seqs[s][done[s]..end],
                        start: done[s],
                        all_logits: true,
                    }
                })
                .collect();
            let out = model.step(&chunks, kv.as_mut()).unwrap();
            for (chunk, logits) in chunks.iter().zip(&out) {
                let s = chunk.seq as usize;
                for j in 0..chunk.tokens.len() {
                    let pos = chunk.start + j;
                    close(
                        &logits[j * 97..(j + 1) * 97],
                        &want[s][pos],
                        tol,
                        &format!("{} seq {s} pos {pos}", kv.name()),
                    );
                }
                done[s] += chunk.tokens.len();
            }
            step += 1;
        }
        for s in 0..4 {
            kv.free(s).unwrap();
        }
        assert_eq!(kv.usage().bytes_allocated, 0);
    }
}

#[test]
fn bad_batches_and_configs_are_errors() {
    let tiny = tiny_model("errors");
    let model = Llama::from_hf_dir(&tiny.dir).unwrap();
    let mut kv = PagedKv::new(dims(), 4, 16).unwrap();
    let err = |r: Result<Vec<Vec<f32>>, ModelError>| r.unwrap_err().to_string();
    let t = [1u32, 2, 3];
    let one = |tokens, start| {
        [SeqChunk {
            seq: 1,
            tokens,
            start,
            all_logits: false,
        }]
    };
    // The pass itself never reserves: unreserved tokens are an error, not an allocation.
    assert!(err(model.forward(&one(&t, 0), &kv)).contains("holds no KV memory"));
    assert!(err(model.forward(&one(&[200], 0), &kv)).contains("outside the vocabulary"));
    kv.reserve(1, 2).unwrap();
    assert!(err(model.forward(&one(&t, 0), &kv)).contains("2 are reserved"));
    assert!(err(model.step(&one(&t, 5), &mut kv)).contains("starts at 5"));
    let twice = [one(&t, 0)[0]; 2];
    assert!(err(model.step(&twice, &mut kv)).contains("repeated"));
    let long = vec![1u32; 65];
    assert!(err(model.step(&one(&long, 0), &mut kv)).contains("out of KV memory"));
    kv.free(1).unwrap();
    assert_eq!(kv.free_blocks(), 4, "nothing held after the failures");
    let mut wrong = PagedKv::new(
        KvDims {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
        },
        4,
        16,
    )
    .unwrap();
    assert!(err(model.step(&one(&t, 0), &mut wrong)).contains("does not fit"));

    let e = LlamaConfig::from_hf_json(&CONFIG.replace("\"llama\"", "\"gpt_neox\"")).unwrap_err();
    assert!(e.to_string().contains("gpt_neox"), "{e}");
    let e = LlamaConfig::from_hf_json("{not json").unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
    let missing = std::env::temp_dir().join("vkv-no-such-model-dir");
    let e = Llama::from_hf_dir(&missing).err().unwrap();
    assert!(e.to_string().contains("vkv-no-such-model-dir"), "{e}");
}

/// Rewrite `dir/model.safetensors` through `edit(name, shape, bytes)` (`None` drops the tensor).
fn rewrite(
    dir: &std::path::Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            let (shape, data) = edit(&n, v.shape().to_vec(), v.data().to_vec())?;
            Some((n, v.dtype(), shape, data))
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn hf_directories_with_wrong_tensors_or_files_are_readable_errors() {
    let msg = |dir: &std::path::Path| Llama::from_hf_dir(dir).err().unwrap().to_string();
    // A transposed matrix (same element count) is caught by its shape.
    let t = tiny_model("transposed");
    rewrite(&t.dir, |n, s, b| {
        Some(if n == "model.layers.1.self_attn.k_proj.weight" {
            (vec![s[1], s[0]], b)
        } else {
            (s, b)
        })
    });
    let e = msg(&t.dir);
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight")
            && e.contains("expected shape [16, 48] (from config.json), found [48, 16]"),
        "{e}"
    );
    // A missing tensor is named.
    let t = tiny_model("missing");
    rewrite(&t.dir, |n, s, b| {
        (n != "model.layers.2.mlp.up_proj.weight").then_some((s, b))
    });
    let e = msg(&t.dir);
    assert!(
        e.contains("tensor model.layers.2.mlp.up_proj.weight: missing"),
        "{e}"
    );
    // A truncated file says so, with its path.
    let t = tiny_model("truncated");
    let path = t.dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = msg(&t.dir);
    assert!(
        e.contains("model.safetensors is not a valid safetensors file") && e.contains("truncated"),
        "{e}"
    );
    // Features the forward pass lacks are refused, not ignored.
    let t = tiny_model("bias");
    std::fs::write(
        t.dir.join("config.json"),
        CONFIG.replace("\"llama\",", "\"llama\", \"attention_bias\": true,"),
    )
    .unwrap();
    let e = msg(&t.dir);
    assert!(e.contains("attention_bias"), "{e}");
    let e = LlamaConfig::from_hf_json(
        &CONFIG.replace("\"llama\",", "\"llama\", \"hidden_act\": \"gelu\","),
    )
    .unwrap_err();
    assert!(e.to_string().contains("gelu"), "{e}");
}

#[test]
fn rope_settings_read_alike_from_transformers_4_and_5_configs() {
    let v4 = CONFIG.replace(
        "\"rope_theta\": 10000.0,",
        r#""rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192},"#,
    );
    let v5 = CONFIG.replace(
        "\"rope_theta\": 10000.0,",
        r#""rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192},"#,
    );
    let (a, b) = (
        LlamaConfig::from_hf_json(&v4).unwrap(),
        LlamaConfig::from_hf_json(&v5).unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(a.rope_theta, 500000.0);
    assert_eq!(
        a.rope_scaling.unwrap().original_max_position_embeddings,
        8192.0
    );
    let plain = CONFIG.replace(
        "\"rope_theta\": 10000.0,",
        r#""rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},"#,
    );
    let c = LlamaConfig::from_hf_json(&plain).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (20000.0, None));
    let yarn = CONFIG.replace(
        "\"rope_theta\": 10000.0,",
        r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0},"#,
    );
    let e = LlamaConfig::from_hf_json(&yarn).unwrap_err();
    assert!(e.to_string().contains("only llama3"), "{e}");
}

#[test]
fn an_hf_directory_without_a_tokenizer_loads_for_token_ids() {
    let t = tiny_model("no-tokenizer");
    let loaded = crate::load_model(&t.dir).unwrap();
    assert!(loaded.name.contains("no tokenizer.json"), "{}", loaded.name);
    let direct = Llama::from_hf_dir(&t.dir).unwrap();
    let mut kv = PagedKv::new(dims(), 8, 16).unwrap();
    let mut kv2 = PagedKv::new(dims(), 8, 16).unwrap();
    let chunk = [SeqChunk {
        seq: 0,
        tokens: &[5, 17, 96, 3],
        start: 0,
        all_logits: false,
    }];
    assert_eq!(
        loaded.model.step(&chunk, &mut kv).unwrap(),
        direct.step(&chunk, &mut kv2).unwrap()
    );
}

#[test]
fn presets_have_the_published_shapes_and_unknown_names_are_refused() {
    let l3 = LlamaConfig::preset("llama-3-8b").unwrap();
    assert_eq!((l3.num_layers, l3.num_kv_heads, l3.head_dim), (32, 8, 128));
    // Meta-Llama-3-8B has 8.03 B parameters.
    assert_eq!(l3.num_parameters(), 8_030_261_248);
    // Meta-Llama-3-70B has 70.55 B parameters.
    let l70 = LlamaConfig::preset("llama-3-70b").unwrap();
    assert_eq!(l70.num_parameters(), 70_553_706_496);
    let smol = LlamaConfig::preset("smollm2-135m").unwrap();
    assert!(smol.tie_word_embeddings);
    // SmolLM2-135M: 134.5 M parameters (tied embeddings).
    assert_eq!(smol.num_parameters(), 134_515_008);
    for name in LlamaConfig::preset_names() {
        let c = LlamaConfig::preset(name).unwrap();
        let kv = crate::presets::kv_shape(name).unwrap();
        assert_eq!(
            (
                c.num_layers,
                c.num_kv_heads,
                c.head_dim,
                c.max_position_embeddings
            ),
            (kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.max_len),
            "{name}: the model preset and the KV-shape preset disagree"
        );
    }
    let err = LlamaConfig::preset("llama-9").unwrap_err().to_string();
    assert!(err.contains("llama-9") && err.contains("yi-6b"), "{err}");
}

/// A small config of the preset conventions (half-split RoPE), for fast tests.
fn small_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 211,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_scaling: None,
        rope_style: vkv_kernels::cpu::RopeStyle::Half,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
    }
}

#[test]
fn random_weights_are_seeded_bf16_exact_and_dense_export_matches_them() {
    let a = Llama::random(small_config(), 7).unwrap();
    let b = Llama::random(small_config(), 7).unwrap();
    let c = Llama::random(small_config(), 8).unwrap();
    let (la, lb, lc) = (
        a.dense_layer(1).unwrap(),
        b.dense_layer(1).unwrap(),
        c.dense_layer(1).unwrap(),
    );
    assert_eq!(la.qkv, lb.qkv);
    assert_ne!(la.qkv, lc.qkv);
    assert_eq!(la.qkv.len(), (4 + 2 * 2) * 16 * 64);
    assert_eq!(la.gate_up.len(), 2 * 96 * 64);
    assert_eq!(la.w_down.len(), 64 * 96);
    assert!(a.dense_layer(2).is_none());
    let e = a.dense_embedding();
    assert_eq!(e.len(), 211 * 64);
    for x in e.iter().chain(&la.qkv).chain(&la.attn_norm) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *x, "not bf16-exact");
        assert!(x.is_finite());
    }
    // Scales: the embedding spans ±1, a projection ±√(3/64), norms 1 ± 0.1.
    let max = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max(&e) > 0.9 && max(&e) <= 1.0);
    assert!(max(&la.qkv) > 0.18 && max(&la.qkv) <= (3.0f32 / 64.0).sqrt() + 1e-3);
    assert!(la.attn_norm.iter().all(|x| (0.89..=1.11).contains(x)));
    assert_ne!(a.dense_lm_head().unwrap(), e);
}

#[test]
fn a_random_preset_model_runs_on_the_cpu_and_is_deterministic() {
    let run = || {
        let model = Llama::random(LlamaConfig::preset("smollm2-135m").unwrap(), 1).unwrap();
        let c = &model.config;
        let mut kv = PagedKv::new(c.kv_dims(), 4, 16).unwrap();
        let out = model
            .step(
                &[SeqChunk {
                    seq: 0,
                    tokens: &[1, 2, 3, 4, 5],
                    start: 0,
                    all_logits: false,
                }],
                &mut kv,
            )
            .unwrap();
        out.into_iter().next().unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a.len(), 49152);
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(a, b);
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
    assert!(var > 1e-3, "logits nearly constant: variance {var}");
}

#[test]
fn batches_split_at_the_chunk_boundary_nearest_half_the_rows() {
    let tokens = [0u32; 64];
    let batch = |lens: &[usize]| -> Vec<SeqChunk<'_>> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| SeqChunk {
                seq: i as u64,
                tokens: &tokens[..n],
                start: 0,
                all_logits: false,
            })
            .collect()
    };
    assert_eq!(split_point(&batch(&[1])), None);
    assert_eq!(split_point(&batch(&[])), None);
    assert_eq!(split_point(&batch(&[1; 16])), Some(8));
    assert_eq!(split_point(&batch(&[1, 1, 1])), Some(1));
    assert_eq!(split_point(&batch(&[60, 1, 1, 1])), Some(1));
    assert_eq!(split_point(&batch(&[1, 1, 1, 60])), Some(3));
    assert_eq!(split_point(&batch(&[10, 20, 30])), Some(2));
}
