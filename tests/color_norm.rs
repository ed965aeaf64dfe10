//! Tests of `leuknet::color_norm`: shape and range, each method's defining property, JSON form.
//!
//! Real images come from `$LEUKNET_DATA` (default `../shared/data`); the tests that need them
//! print why and pass when the folder is absent.

use std::path::{Path, PathBuf};

use leuknet::color_norm::{lab_mean_std, reinhard_target_from, ColorNormalization};
use leuknet::preprocess::{preprocess, Limits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 64;

/// A smooth, colourful synthetic image in [0.1, 0.9] (no clipping under mild transforms).
fn synthetic(size: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plane = size * size;
    let mut v = vec![0.0f32; 3 * plane];
    let phase: [f32; 3] = [rng.random(), rng.random(), rng.random()];
    for ch in 0..3 {
        for r in 0..size {
            for c in 0..size {
                let x = c as f32 / size as f32;
                let y = r as f32 / size as f32;
                let base = 0.5
                    + 0.25 * ((x * 3.0 + phase[ch] * 6.0).sin() * (y * 2.0 + ch as f32).cos())
                    + 0.1 * (rng.random::<f32>() - 0.5);
                v[ch * plane + r * size + c] = base.clamp(0.1, 0.9);
            }
        }
    }
    v
}

fn all_methods(target: ([f32; 3], [f32; 3])) -> Vec<ColorNormalization> {
    vec![
        ColorNormalization::None,
        ColorNormalization::Grayscale {
            contrast_stretch: false,
        },
        ColorNormalization::Grayscale {
            contrast_stretch: true,
        },
        ColorNormalization::ChannelStandardize,
        ColorNormalization::Reinhard {
            target_mean: target.0,
            target_std: target.1,
        },
    ]
}

fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LEUKNET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    dir.join("MANIFEST.csv").is_file().then_some(dir)
}

/// The first image of each dataset in the manifest, preprocessed to `size`; None (after a
/// message) without the shared data.
fn real_images(test: &str, size: u32) -> Option<Vec<(String, Vec<f32>)>> {
    let Some(dir) = data_dir() else {
        eprintln!(
            "skipping {test}: shared data not found (set LEUKNET_DATA to the shared data folder)"
        );
        return None;
    };
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.csv")).expect("read manifest");
    let mut seen = Vec::<String>::new();
    let mut out = Vec::new();
    for line in manifest.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 2 || seen.iter().any(|d| d == f[0]) {
            continue;
        }
        seen.push(f[0].to_owned());
        let bytes = std::fs::read(dir.join(f[1])).expect("read image");
        let t = preprocess(&bytes, size, &Limits::default()).expect("preprocess");
        out.push((f[1].to_owned(), t.tensor));
    }
    Some(out)
}

fn assert_range(v: &[f32], what: &str) {
    for &x in v {
        assert!(
            x.is_finite() && (0.0..=1.0).contains(&x),
            "{what}: value {x} outside [0, 1]"
        );
    }
}

#[test]
fn every_method_keeps_shape_and_range() {
    let img = synthetic(SIZE, 1);
    let target = reinhard_target_from(&[&synthetic(SIZE, 2)], SIZE);
    // Extreme inputs too: black, white, saturated primaries, noise over the full range.
    let mut extreme = vec![0.0f32; 3 * SIZE * SIZE];
    let mut rng = StdRng::seed_from_u64(9);
    for v in extreme.iter_mut() {
        *v = match rng.random_range(0..4) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.random(),
        };
    }
    let flat = vec![0.3f32; 3 * SIZE * SIZE];
    for method in all_methods(target) {
        for (name, input) in [("synthetic", &img), ("extreme", &extreme), ("flat", &flat)] {
            let mut x = input.clone();
            method.apply(&mut x, SIZE);
            assert_eq!(x.len(), 3 * SIZE * SIZE);
            assert_range(&x, &format!("{} on {name}", method.kind()));
        }
    }
}

#[test]
fn every_method_keeps_range_on_real_images() {
    let Some(images) = real_images("every_method_keeps_range_on_real_images", 224) else {
        return;
    };
    let refs: Vec<&[f32]> = images.iter().map(|(_, t)| t.as_slice()).collect();
    let target = reinhard_target_from(&refs, 224);
    for method in all_methods(target) {
        for (name, t) in &images {
            let mut x = t.clone();
            method.apply(&mut x, 224);
            assert_eq!(x.len(), 3 * 224 * 224);
            assert_range(&x, &format!("{} on {name}", method.kind()));
        }
    }
}

#[test]
fn none_is_identity_and_default() {
    assert_eq!(ColorNormalization::default(), ColorNormalization::None);
    let img = synthetic(SIZE, 3);
    let mut x = img.clone();
    ColorNormalization::None.apply(&mut x, SIZE);
    assert_eq!(x, img);
}

#[test]
fn grayscale_equalises_channels() {
    let plane = SIZE * SIZE;
    for stretch in [false, true] {
        let mut x = synthetic(SIZE, 4);
        let orig = x.clone();
        ColorNormalization::Grayscale {
            contrast_stretch: stretch,
        }
        .apply(&mut x, SIZE);
        for i in 0..plane {
            assert_eq!(x[i], x[plane + i]);
            assert_eq!(x[i], x[2 * plane + i]);
        }
        if !stretch {
            let y = 0.299 * orig[7] + 0.587 * orig[plane + 7] + 0.114 * orig[2 * plane + 7];
            assert!((x[7] - y).abs() < 1e-6);
        } else {
            let (lo, hi) = x[..plane]
                .iter()
                .fold((1.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            assert_eq!((lo, hi), (0.0, 1.0), "stretch should fill [0, 1]");
        }
    }
}

#[test]
fn channel_standardize_centres_each_channel() {
    let plane = SIZE * SIZE;
    let mut x = synthetic(SIZE, 5);
    ColorNormalization::ChannelStandardize.apply(&mut x, SIZE);
    for ch in 0..3 {
        let p = &x[ch * plane..(ch + 1) * plane];
        let mean = p.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64;
        let std = (p
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / plane as f64)
            .sqrt();
        // Little clipping on this smooth image: mean 0.5, std 0.25.
        assert!((mean - 0.5).abs() < 0.01, "channel {ch} mean {mean}");
        assert!((std - 0.25).abs() < 0.01, "channel {ch} std {std}");
    }
}

fn assert_close_2pct(got: [f32; 3], want: [f32; 3], what: &str) {
    for ch in 0..3 {
        // 2 % of the value, but at least 2 % of a 0-100 unit scale for values near zero (a*, b*).
        let tol = 0.02 * want[ch].abs().max(5.0);
        assert!(
            (got[ch] - want[ch]).abs() <= tol,
            "{what}: Lab channel {ch}: got {} want {} (tol {tol})",
            got[ch],
            want[ch]
        );
    }
}

#[test]
fn reinhard_hits_target_on_synthetic_image() {
    let src = synthetic(SIZE, 6);
    let (tm, ts) = reinhard_target_from(&[&synthetic(SIZE, 7), &synthetic(SIZE, 8)], SIZE);
    let mut x = src.clone();
    ColorNormalization::Reinhard {
        target_mean: tm,
        target_std: ts,
    }
    .apply(&mut x, SIZE);
    let (m, s) = lab_mean_std(&x, SIZE);
    assert_close_2pct(m, tm, "mean");
    assert_close_2pct(s, ts, "std");
    // The image's own statistics as target: (almost) the identity.
    let (om, os) = lab_mean_std(&src, SIZE);
    let mut y = src.clone();
    ColorNormalization::Reinhard {
        target_mean: om,
        target_std: os,
    }
    .apply(&mut y, SIZE);
    let max_diff = y
        .iter()
        .zip(&src)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 2e-3,
        "self-target changed the image by {max_diff}"
    );
}

/// Share of pixels with a channel at exactly 0 or 1 after, but not before, a transform: the
/// pixels whose new colour fell outside the sRGB gamut and was clipped.
fn clipped_share(before: &[f32], after: &[f32], size: usize) -> f32 {
    let plane = size * size;
    let at_edge =
        |t: &[f32], i: usize| (0..3).any(|ch| t[ch * plane + i] == 0.0 || t[ch * plane + i] == 1.0);
    let n = (0..plane)
        .filter(|&i| at_edge(after, i) && !at_edge(before, i))
        .count();
    n as f32 / plane as f32
}

/// On real images the transfer meets the target within 2 % wherever the new colours stay in
/// the sRGB gamut (at most 1 % of pixels clipped); where more are clipped (a nearly white
/// whole field pushed to a darker, more contrasted target) the statistics still move most of the
/// way, and the test asserts that (within 15 %) and prints the figures.
#[test]
fn reinhard_hits_target_on_real_images() {
    let Some(images) = real_images("reinhard_hits_target_on_real_images", 224) else {
        return;
    };
    let refs: Vec<&[f32]> = images.iter().map(|(_, t)| t.as_slice()).collect();
    let (tm, ts) = reinhard_target_from(&refs, 224);
    eprintln!(
        "Reinhard target over {} images: mean {tm:?} std {ts:?}",
        refs.len()
    );
    let mut exact = 0;
    for (name, t) in &images {
        let before = lab_mean_std(t, 224);
        let mut x = t.clone();
        ColorNormalization::Reinhard {
            target_mean: tm,
            target_std: ts,
        }
        .apply(&mut x, 224);
        let (m, s) = lab_mean_std(&x, 224);
        let clipped = clipped_share(t, &x, 224);
        eprintln!(
            "{name}: before mean {:?} std {:?}; after mean {m:?} std {s:?}; {:.2} % pixels clipped",
            before.0,
            before.1,
            clipped * 100.0
        );
        if clipped <= 0.01 {
            exact += 1;
            assert_close_2pct(m, tm, &format!("{name} mean"));
            assert_close_2pct(s, ts, &format!("{name} std"));
        } else {
            for ch in 0..3 {
                for (got, want, what) in [(m[ch], tm[ch], "mean"), (s[ch], ts[ch], "std")] {
                    let tol = 0.15 * want.abs().max(5.0);
                    assert!(
                        (got - want).abs() <= tol,
                        "{name} {what} channel {ch}: got {got} want {want} (clipped, tol {tol})"
                    );
                }
            }
        }
    }
    assert!(
        exact >= images.len() / 2,
        "only {exact} images stayed in gamut"
    );
}

#[test]
fn reinhard_target_of_one_image_is_its_statistics() {
    let img = synthetic(SIZE, 10);
    assert_eq!(
        reinhard_target_from(&[&img], SIZE),
        lab_mean_std(&img, SIZE)
    );
    let white = vec![1.0f32; 3 * SIZE * SIZE];
    let (m, s) = lab_mean_std(&white, SIZE);
    assert!(
        (m[0] - 100.0).abs() < 0.01 && m[1].abs() < 0.01 && m[2].abs() < 0.01,
        "{m:?}"
    );
    assert_eq!(s, [0.0; 3]);
}

#[test]
fn serde_round_trip_with_kind_tags() {
    let cases = [
        (ColorNormalization::None, r#"{"kind":"none"}"#),
        (
            ColorNormalization::Grayscale {
                contrast_stretch: true,
            },
            r#"{"kind":"grayscale","contrast_stretch":true}"#,
        ),
        (
            ColorNormalization::ChannelStandardize,
            r#"{"kind":"channel_standardize"}"#,
        ),
        (
            ColorNormalization::Reinhard {
                target_mean: [60.5, 12.25, -8.0],
                target_std: [15.0, 6.5, 4.75],
            },
            r#"{"kind":"reinhard","target_mean":[60.5,12.25,-8.0],"target_std":[15.0,6.5,4.75]}"#,
        ),
    ];
    for (value, json) in cases {
        assert_eq!(serde_json::to_string(&value).unwrap(), json);
        let back: ColorNormalization = serde_json::from_str(json).unwrap();
        assert_eq!(back, value);
        assert_eq!(
            serde_json::from_value::<serde_json::Value>(serde_json::to_value(&value).unwrap())
                .unwrap()["kind"],
            value.kind()
        );
    }
    // The grayscale flag defaults to false; unknown kinds are refused.
    let g: ColorNormalization = serde_json::from_str(r#"{"kind":"grayscale"}"#).unwrap();
    assert_eq!(
        g,
        ColorNormalization::Grayscale {
            contrast_stretch: false
        }
    );
    assert!(serde_json::from_str::<ColorNormalization>(r#"{"kind":"macenko"}"#).is_err());
}
