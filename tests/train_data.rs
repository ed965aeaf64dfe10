//! Tests of `leuknet::train::data`: loading (manifest and folders), bad-data reporting,
//! deduplication, per-dataset rules, and leak-free splits and balanced batches.
//!
//! Real data: `LEUKNET_DATA` or `../shared/data` (a folder with `MANIFEST.csv`); tests that need
//! it print "skipping: …" and return when it is absent. Small fixtures are generated in tempdirs.
#![cfg(feature = "train")]

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use leuknet::train::data::{
    apply_rules, balanced_batches, dedup, has_both_classes, inner_source_folds, load_folders,
    load_manifest, load_rules, lodo_splits, sha256_hex, stratified_kfold, validate_images,
    DataError, DataReport, DatasetRules, MaskRect, ProblemKind, Sample,
};

// ----------------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------------

fn data_root() -> Option<PathBuf> {
    let root = std::env::var_os("LEUKNET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    root.join("MANIFEST.csv").is_file().then_some(root)
}

/// The real manifest, loaded and deduplicated once per test binary.
fn real() -> Option<&'static (Vec<Sample>, DataReport)> {
    static REAL: OnceLock<Option<(Vec<Sample>, DataReport)>> = OnceLock::new();
    REAL.get_or_init(|| {
        let root = data_root()?;
        let (samples, mut report) = load_manifest(&root.join("MANIFEST.csv")).expect("manifest");
        let samples = dedup(samples, &mut report);
        Some((samples, report))
    })
    .as_ref()
}

macro_rules! real_or_skip {
    () => {
        match real() {
            Some(r) => r,
            None => {
                println!("skipping: no real data (set LEUKNET_DATA or provide ../shared/data)");
                return;
            }
        }
    };
}

fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn sample(dataset: &str, label: u8, patient: Option<&str>, id: usize) -> Sample {
    Sample {
        dataset: dataset.to_string(),
        path: PathBuf::from(format!("{dataset}/{id}.png")),
        label,
        fine_label: String::new(),
        patient: patient.map(str::to_string),
        sha256: format!("{id:064x}"),
    }
}

fn datasets(samples: &[Sample], idx: &[usize]) -> HashSet<String> {
    idx.iter().map(|&i| samples[i].dataset.clone()).collect()
}

fn assert_partition(n: usize, train: &[usize], test: &[usize]) {
    let tr: HashSet<usize> = train.iter().copied().collect();
    let te: HashSet<usize> = test.iter().copied().collect();
    assert_eq!(tr.len(), train.len(), "duplicate train index");
    assert_eq!(te.len(), test.len(), "duplicate test index");
    assert!(tr.is_disjoint(&te), "an index is on both sides");
    assert!(tr.iter().chain(&te).all(|&i| i < n));
}

fn assert_no_leak(samples: &[Sample], train: &[usize], test: &[usize]) {
    let sha = |idx: &[usize]| -> HashSet<String> {
        idx.iter().map(|&i| samples[i].sha256.clone()).collect()
    };
    assert!(sha(train).is_disjoint(&sha(test)), "a sha256 on both sides");
    let patients = |idx: &[usize]| -> HashSet<(String, String)> {
        idx.iter()
            .filter_map(|&i| {
                let s = &samples[i];
                s.patient.clone().map(|p| (s.dataset.clone(), p))
            })
            .collect()
    };
    assert!(
        patients(train).is_disjoint(&patients(test)),
        "a patient on both sides"
    );
}

// ----------------------------------------------------------------------------------------------
// Real data
// ----------------------------------------------------------------------------------------------

#[test]
fn real_manifest_loads_all_samples() {
    let (samples, report) = real_or_skip!();
    assert!(report.problems.is_empty(), "{}", report.summary());
    assert!(report.duplicates.is_empty(), "{}", report.summary());
    assert_eq!(samples.len(), 3147);
    assert_eq!(report.loaded, 3147);
    let mut per: HashMap<&str, [usize; 2]> = HashMap::new();
    for s in samples {
        per.entry(&s.dataset).or_default()[usize::from(s.label)] += 1;
        assert!(s.path.is_file(), "{}", s.path.display());
        assert_eq!(s.sha256.len(), 64);
    }
    let expect: HashMap<&str, [usize; 2]> = [
        ("ALL-IDB2", [129, 129]),
        ("ALL-Aria2021", [400, 400]),
        ("DeepAPL", [500, 500]),
        ("PBC-Acevedo2020", [750, 0]),
        ("JTSC-Zheng2018", [299, 0]),
        ("CellaVision-Zheng2018", [40, 0]),
    ]
    .into_iter()
    .collect();
    assert_eq!(per, expect);
    let deepapl_patients: HashSet<&str> = samples
        .iter()
        .filter(|s| s.dataset == "DeepAPL")
        .map(|s| s.patient.as_deref().expect("DeepAPL has patient ids"))
        .collect();
    assert!(deepapl_patients.len() > 50, "{}", deepapl_patients.len());
    assert!(samples
        .iter()
        .filter(|s| s.dataset != "DeepAPL")
        .all(|s| s.patient.is_none()));
}

/// Decodes a deterministic tenth of the real images (every format and dataset is hit), or all
/// of them with `LEUKNET_VALIDATE_ALL=1` (about 2 minutes in a debug build on 2 cores).
#[test]
fn real_images_decode() {
    let (samples, _) = real_or_skip!();
    let all = std::env::var("LEUKNET_VALIDATE_ALL").is_ok_and(|v| v == "1");
    let chosen: Vec<Sample> = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| all || i % 10 == 0)
        .map(|(_, s)| s.clone())
        .collect();
    let ds: HashSet<&str> = chosen.iter().map(|s| s.dataset.as_str()).collect();
    assert_eq!(ds.len(), 6);
    let mut report = DataReport::default();
    let t = std::time::Instant::now();
    let kept = validate_images(chosen.clone(), &mut report);
    println!("validated {} images in {:.1?}", chosen.len(), t.elapsed());
    assert!(report.problems.is_empty(), "{}", report.summary());
    assert_eq!(kept, chosen);
    assert_eq!(report.loaded, chosen.len());
}

#[test]
fn real_dedup_removes_planted_cross_dataset_copy() {
    let (samples, _) = real_or_skip!();
    let mut planted = samples.clone();
    let original = samples
        .iter()
        .find(|s| s.dataset == "ALL-IDB2")
        .unwrap()
        .clone();
    let mut copy = original.clone();
    copy.dataset = "PBC-Acevedo2020".to_string();
    copy.path = PathBuf::from("PBC-Acevedo2020/planted-copy.jpg");
    copy.sha256 = copy.sha256.to_uppercase(); // hashes compare case-insensitively
    planted.push(copy);
    let mut report = DataReport::default();
    let out = dedup(planted, &mut report);
    assert_eq!(out.len(), samples.len());
    assert_eq!(report.duplicates.len(), 1);
    let d = &report.duplicates[0];
    assert_eq!(d.kept, original.path);
    assert_eq!(d.removed, PathBuf::from("PBC-Acevedo2020/planted-copy.jpg"));
    assert_eq!(d.kept_dataset, "ALL-IDB2");
    assert_eq!(d.removed_dataset, "PBC-Acevedo2020");
    assert_eq!(report.loaded, samples.len());
}

#[test]
fn real_lodo_splits_leak_nothing() {
    let (samples, _) = real_or_skip!();
    let splits = lodo_splits(samples);
    let tested: Vec<&str> = splits
        .iter()
        .map(|s| s.test_dataset.as_deref().unwrap())
        .collect();
    assert_eq!(tested, ["ALL-IDB2", "ALL-Aria2021", "DeepAPL"]);
    for split in &splits {
        assert_partition(samples.len(), &split.train, &split.test);
        assert_eq!(split.train.len() + split.test.len(), samples.len());
        let test_ds = datasets(samples, &split.test);
        assert_eq!(test_ds.len(), 1);
        assert!(test_ds.contains(split.test_dataset.as_deref().unwrap()));
        assert!(datasets(samples, &split.train).is_disjoint(&test_ds));
        assert_no_leak(samples, &split.train, &split.test);
        assert!(has_both_classes(samples, &split.test));
        assert!(has_both_classes(samples, &split.train));
        for one_class in ["PBC-Acevedo2020", "JTSC-Zheng2018", "CellaVision-Zheng2018"] {
            assert!(datasets(samples, &split.train).contains(one_class));
        }
    }
}

#[test]
fn real_kfold_is_stratified_grouped_and_reproducible() {
    let (samples, _) = real_or_skip!();
    let k = 5;
    let splits = stratified_kfold(samples, k, 42);
    assert_eq!(splits.len(), k);
    let mut times_tested = vec![0usize; samples.len()];
    for split in &splits {
        assert_partition(samples.len(), &split.train, &split.test);
        assert_eq!(split.train.len() + split.test.len(), samples.len());
        assert_no_leak(samples, &split.train, &split.test);
        for &i in &split.test {
            times_tested[i] += 1;
        }
    }
    assert!(
        times_tested.iter().all(|&t| t == 1),
        "every sample tested once"
    );

    // Per class: fold counts within ±1.
    for label in [0u8, 1] {
        let counts: Vec<usize> = splits
            .iter()
            .map(|s| {
                s.test
                    .iter()
                    .filter(|&&i| samples[i].label == label)
                    .count()
            })
            .collect();
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        println!("label {label}: per-fold {counts:?}");
        assert!(hi - lo <= 1, "label {label}: {counts:?}");
    }
    // Per dataset x class: even where there are no patient groups, close with them.
    let mut strata: Vec<(String, u8)> = samples
        .iter()
        .map(|s| (s.dataset.clone(), s.label))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    strata.sort();
    let mut spreads = Vec::new();
    for (ds, label) in strata {
        let counts: Vec<usize> = splits
            .iter()
            .map(|s| {
                s.test
                    .iter()
                    .filter(|&&i| samples[i].dataset == ds && samples[i].label == label)
                    .count()
            })
            .collect();
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        println!("{ds} label {label}: per-fold {counts:?}");
        spreads.push((ds, label, spread));
    }
    for (ds, label, spread) in spreads {
        // DeepAPL is grouped by patient (up to 12 images per patient and class).
        let limit = if ds == "DeepAPL" { 3 } else { 1 };
        assert!(spread <= limit, "{ds} label {label}: spread {spread}");
    }
    // Patients: all of one patient's images in one test fold.
    let mut fold_of_patient: HashMap<&str, usize> = HashMap::new();
    for (f, split) in splits.iter().enumerate() {
        for &i in &split.test {
            if let Some(p) = &samples[i].patient {
                assert_eq!(
                    *fold_of_patient.entry(p).or_insert(f),
                    f,
                    "patient {p} split"
                );
            }
        }
    }
    // Reproducible under the seed; another seed gives another assignment.
    assert_eq!(stratified_kfold(samples, k, 42), splits);
    assert_ne!(stratified_kfold(samples, k, 43), splits);
    assert!(stratified_kfold(samples, 1, 42).is_empty());
}

#[test]
fn real_inner_folds_stay_inside_training() {
    let (samples, _) = real_or_skip!();
    for outer in lodo_splits(samples) {
        let outer_train: HashSet<usize> = outer.train.iter().copied().collect();
        let inner = inner_source_folds(samples, &outer.train);
        let held: Vec<String> = inner
            .iter()
            .map(|s| s.test_dataset.clone().unwrap())
            .collect();
        println!("outer {}: inner held-out {held:?}", outer.name);
        // Every training source is held out once (each leaves both classes to train on here).
        let mut expect: Vec<String> = datasets(samples, &outer.train).into_iter().collect();
        expect.sort();
        let mut got = held.clone();
        got.sort();
        assert_eq!(got, expect);
        for split in &inner {
            assert_partition(samples.len(), &split.train, &split.test);
            assert!(split.train.iter().all(|i| outer_train.contains(i)));
            assert!(split.test.iter().all(|i| outer_train.contains(i)));
            assert_eq!(split.train.len() + split.test.len(), outer.train.len());
            assert!(has_both_classes(samples, &split.train));
            assert_no_leak(samples, &split.train, &split.test);
            let ds = split.test_dataset.as_deref().unwrap();
            assert!(!datasets(samples, &split.train).contains(ds));
        }
    }
}

#[test]
fn real_balanced_batches_are_balanced_and_reproducible() {
    let (samples, _) = real_or_skip!();
    let split = &lodo_splits(samples)[0]; // test ALL-IDB2
    let batch = 32;
    let groups: HashSet<(String, u8)> = split
        .train
        .iter()
        .map(|&i| (samples[i].dataset.clone(), samples[i].label))
        .collect();
    assert_eq!(groups.len(), 7); // Aria x2, DeepAPL x2, PBC, JTSC, CellaVision
    let train: HashSet<usize> = split.train.iter().copied().collect();
    let e0 = balanced_batches(samples, &split.train, batch, 7, 0);
    assert_eq!(e0.len(), split.train.len().div_ceil(batch));
    assert_eq!(e0.iter().map(Vec::len).sum::<usize>(), split.train.len());
    for b in &e0 {
        assert!(b.iter().all(|i| train.contains(i)));
        let mut per: HashMap<(String, u8), usize> = groups.iter().map(|g| (g.clone(), 0)).collect();
        for &i in b {
            *per.get_mut(&(samples[i].dataset.clone(), samples[i].label))
                .unwrap() += 1;
        }
        let lo = per.values().min().unwrap();
        let hi = per.values().max().unwrap();
        assert!(hi - lo <= 1, "{per:?}");
    }
    assert_eq!(balanced_batches(samples, &split.train, batch, 7, 0), e0);
    let e1 = balanced_batches(samples, &split.train, batch, 7, 1);
    assert_ne!(e1, e0);
    assert_ne!(balanced_batches(samples, &split.train, batch, 8, 0), e0);
    // Large groups continue their permutation across epochs: PBC (750 images, about 1/7 of each
    // epoch of 2889) has no repeats in epoch 0, and epochs 0 and 1 together (more than 750 PBC
    // draws) have used every PBC image.
    let pbc = |e: &Vec<Vec<usize>>| -> Vec<usize> {
        e.iter()
            .flatten()
            .copied()
            .filter(|&i| samples[i].dataset == "PBC-Acevedo2020")
            .collect()
    };
    let p0 = pbc(&e0);
    let unique0: HashSet<usize> = p0.iter().copied().collect();
    assert!(p0.len() < 750 && p0.len() > 300, "{}", p0.len());
    assert_eq!(unique0.len(), p0.len(), "repeats inside one pass of PBC");
    let p1 = pbc(&e1);
    assert!(p0.len() + p1.len() >= 750);
    let unique01: HashSet<usize> = p0.iter().chain(&p1).copied().collect();
    assert_eq!(unique01.len(), 750);
}

#[test]
fn real_aria_rule_masks_only_the_corner() {
    let Some(root) = data_root() else {
        println!("skipping: no real data");
        return;
    };
    let rules = load_rules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/datasets.json"))
        .expect("rules");
    let aria = &rules["ALL-Aria2021"];
    let bytes = std::fs::read(root.join("ALL-Aria2021/Benign/WBC-Benign-044.jpg")).unwrap();
    let size = 224;
    let before = leuknet::preprocess::preprocess(&bytes, size as u32, &Default::default())
        .unwrap()
        .tensor;
    let mut after = before.clone();
    apply_rules(aria, &mut after, size);
    let (c0, r0, c1, r1) = aria.mask[0].pixels(size);
    assert_eq!((c0, r0, c1, r1), (188, 188, 224, 224));
    // This image has the large white "200 pix" box: before masking the corner holds near-black
    // bar pixels, afterwards the corner is one colour that also occurs outside it.
    let plane = size * size;
    let corner_min = (r0..r1)
        .flat_map(|r| (c0..c1).map(move |c| r * size + c))
        .map(|p| before[p].max(before[plane + p]).max(before[2 * plane + p]))
        .fold(1.0f32, f32::min);
    assert!(
        corner_min < 0.2,
        "expected the black scale bar, got {corner_min}"
    );
    for ch in 0..3 {
        let fill = after[ch * plane + r0 * size + c0];
        for r in 0..size {
            for c in 0..size {
                let p = ch * plane + r * size + c;
                if (r0..r1).contains(&r) && (c0..c1).contains(&c) {
                    assert_eq!(after[p], fill);
                } else {
                    assert_eq!(after[p], before[p]);
                }
            }
        }
    }
}

#[test]
fn real_allidb2_folder_matches_manifest() {
    let (samples, _) = real_or_skip!();
    let root = data_root().unwrap();
    let (loaded, report) = load_folders(&root.join("ALL-IDB2"), "ALL-IDB2").unwrap();
    assert!(report.problems.is_empty(), "{}", report.summary());
    assert_eq!(loaded.len(), 258);
    let by_sha: HashMap<&str, u8> = samples
        .iter()
        .filter(|s| s.dataset == "ALL-IDB2")
        .map(|s| (s.sha256.as_str(), s.label))
        .collect();
    for s in &loaded {
        assert_eq!(
            by_sha.get(s.sha256.as_str()),
            Some(&s.label),
            "{}",
            s.path.display()
        );
    }
}

// ----------------------------------------------------------------------------------------------
// Generated fixtures
// ----------------------------------------------------------------------------------------------

#[test]
fn manifest_bad_rows_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good_a = png(8, 8, [200, 10, 10]);
    let good_b = png(8, 8, [10, 200, 10]);
    let good_c = png(9, 7, [10, 10, 200]);
    let corrupt = b"\x89PNG\r\n\x1a\nthis is not really a png".to_vec();
    let other = png(8, 8, [1, 2, 3]);
    write(&root.join("A/a.png"), &good_a);
    write(&root.join("A/b.png"), &good_b);
    write(&root.join("B/c.png"), &good_c);
    write(&root.join("B/corrupt.png"), &corrupt);
    write(&root.join("B/label.png"), &other);
    write(&root.join("B/wrongsha.png"), &other);
    let h = |b: &[u8]| sha256_hex(b);
    let csv = format!(
        "dataset,path,binary_label,label,patient_id,sha256,width,height,format\n\
         A,A/a.png,1,\"blast, no lineage spec\",P1,{},8,8,PNG\n\
         A,A/b.png,0,normal,P2,{},8,8,PNG\r\n\
         B,B/c.png,0,normal,,{},9,7,PNG\n\
         B,B/corrupt.png,1,blast,,{},8,8,PNG\n\
         B,B/missing.png,1,blast,,{},8,8,PNG\n\
         B,B/label.png,2,blast,,{},8,8,PNG\n\
         B,B/wrongsha.png,1,blast,,{},8,8,PNG\n\
         B,B/short.png,1\n\
         \n",
        h(&good_a),
        h(&good_b).to_uppercase(),
        h(&good_c),
        h(&corrupt),
        h(&good_a),
        h(&other),
        h(&good_a),
    );
    write(&root.join("MANIFEST.csv"), csv.as_bytes());
    let (samples, mut report) = load_manifest(&root.join("MANIFEST.csv")).unwrap();
    println!("{}", report.summary());

    let names: Vec<&str> = samples
        .iter()
        .map(|s| s.path.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["a.png", "b.png", "c.png", "corrupt.png"]);
    assert_eq!(report.loaded, 4);
    assert_eq!(samples[0].fine_label, "blast, no lineage spec");
    assert_eq!(samples[0].patient.as_deref(), Some("P1"));
    assert_eq!(samples[0].label, 1);
    assert_eq!(samples[1].sha256, h(&good_b));
    assert_eq!(samples[2].patient, None);
    assert_eq!(samples[0].path, root.join("A/a.png"));

    let find = |report: &DataReport, kind: ProblemKind| {
        let found: Vec<_> = report.problems.iter().filter(|p| p.kind == kind).collect();
        assert_eq!(found.len(), 1, "{kind:?}: {found:?}");
        found[0].clone()
    };
    let missing = find(&report, ProblemKind::Missing);
    assert_eq!(missing.path, root.join("B/missing.png"));
    assert!(missing.reason.contains("line 6"), "{}", missing.reason);
    let unknown = find(&report, ProblemKind::UnknownLabel);
    assert_eq!(unknown.path, root.join("B/label.png"));
    assert!(unknown.reason.contains("\"2\""), "{}", unknown.reason);
    let sha = find(&report, ProblemKind::ShaMismatch);
    assert_eq!(sha.path, root.join("B/wrongsha.png"));
    assert!(sha.reason.contains("mismatch"), "{}", sha.reason);
    let bad_row = find(&report, ProblemKind::BadRow);
    assert_eq!(bad_row.path, root.join("MANIFEST.csv"));
    assert!(bad_row.reason.contains("line 9"), "{}", bad_row.reason);
    assert_eq!(report.problems.len(), 4);

    // Decoding is a separate, explicit check.
    let samples = validate_images(samples, &mut report);
    assert_eq!(samples.len(), 3);
    assert_eq!(report.loaded, 3);
    let corrupt = find(&report, ProblemKind::Undecodable);
    assert_eq!(corrupt.path, root.join("B/corrupt.png"));
    assert!(corrupt.reason.contains("decode"), "{}", corrupt.reason);
}

#[test]
fn manifest_errors_for_the_file_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    let missing = load_manifest(&dir.path().join("nope.csv"));
    assert!(matches!(missing, Err(DataError::Io { .. })), "{missing:?}");
    write(&dir.path().join("empty.csv"), b"");
    let empty = load_manifest(&dir.path().join("empty.csv"));
    assert!(matches!(empty, Err(DataError::Header { .. })), "{empty:?}");
    write(
        &dir.path().join("cols.csv"),
        b"dataset,path,label\nA,a.png,x\n",
    );
    match load_manifest(&dir.path().join("cols.csv")) {
        Err(e @ DataError::Header { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("binary_label") && msg.contains("sha256"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dedup_fixture_within_and_across_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = png(8, 8, [50, 60, 70]);
    let b = png(8, 8, [70, 60, 50]);
    write(&root.join("X/Im001_1.png"), &a);
    write(&root.join("X/Im002_1.png"), &a); // within X
    write(&root.join("X/Im003_0.png"), &b);
    write(&root.join("Y/healthy/b.png"), &b); // across datasets
    let (mut all, mut report) = load_folders(&root.join("X"), "X").unwrap();
    let (y, _) = load_folders(&root.join("Y"), "Y").unwrap();
    all.extend(y);
    let kept = dedup(all, &mut report);
    assert_eq!(kept.len(), 2);
    assert_eq!(report.loaded, 2);
    assert_eq!(report.duplicates.len(), 2);
    assert_eq!(report.duplicates[0].kept, root.join("X/Im001_1.png"));
    assert_eq!(report.duplicates[0].removed, root.join("X/Im002_1.png"));
    assert_eq!(report.duplicates[1].kept_dataset, "X");
    assert_eq!(report.duplicates[1].removed_dataset, "Y");
    assert_eq!(report.duplicates[1].removed, root.join("Y/healthy/b.png"));
}

#[test]
fn folders_with_allidb_names_and_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("Im001_1.jpg"), &png(8, 8, [1, 1, 1])); // PNG bytes, any extension
    write(&root.join("im131_0.PNG"), &png(8, 8, [2, 2, 2]));
    write(&root.join("Im002_7.png"), &png(8, 8, [3, 3, 3])); // unknown label
    write(&root.join("notes.txt"), b"hello");
    write(&root.join(".DS_Store"), b"ignored");
    write(&root.join("Leukemic/x.png"), &png(8, 8, [4, 4, 4]));
    write(&root.join("Leukemic/patient7/y.bmp"), &png(8, 8, [5, 5, 5]));
    write(&root.join("leukemic/Thumbs.db"), b"ignored");
    write(&root.join("normal/z.tif"), &png(8, 8, [6, 6, 6]));
    write(&root.join("0/w.png"), &png(8, 8, [7, 7, 7]));
    write(&root.join("Early/v.png"), &png(8, 8, [8, 8, 8])); // unknown class folder
    let (samples, report) = load_folders(root, "fixture").unwrap();
    println!("{}", report.summary());
    let got: Vec<(String, u8, String)> = samples
        .iter()
        .map(|s| {
            (
                s.path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                s.label,
                s.fine_label.clone(),
            )
        })
        .collect();
    let mut expect = vec![
        ("0/w.png".to_string(), 0, "0".to_string()),
        ("Im001_1.jpg".to_string(), 1, "Im001_1".to_string()),
        (
            "Leukemic/patient7/y.bmp".to_string(),
            1,
            "Leukemic/patient7".to_string(),
        ),
        ("Leukemic/x.png".to_string(), 1, "Leukemic".to_string()),
        ("im131_0.PNG".to_string(), 0, "im131_0".to_string()),
        ("normal/z.tif".to_string(), 0, "normal".to_string()),
    ];
    // The leukemic/ folder (lower case, only Thumbs.db) exists on case-sensitive systems only.
    expect.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, expect);
    assert!(samples
        .iter()
        .all(|s| s.dataset == "fixture" && s.patient.is_none()));
    for s in &samples {
        assert_eq!(s.sha256, sha256_hex(&std::fs::read(&s.path).unwrap()));
    }
    let problem_paths: HashSet<(PathBuf, ProblemKind)> = report
        .problems
        .iter()
        .map(|p| (p.path.clone(), p.kind))
        .collect();
    let expect_problems: HashSet<(PathBuf, ProblemKind)> = [
        (root.join("Im002_7.png"), ProblemKind::UnknownLabel),
        (root.join("Early"), ProblemKind::UnknownLabel),
        (root.join("notes.txt"), ProblemKind::NotAnImage),
    ]
    .into_iter()
    .collect();
    assert_eq!(problem_paths, expect_problems);
    assert_eq!(report.loaded, samples.len());

    assert!(matches!(
        load_folders(&root.join("notes.txt"), "x"),
        Err(DataError::NotAFolder { .. })
    ));
}

#[test]
fn rules_mask_only_the_rectangle() {
    let size = 10;
    let plane = size * size;
    let mut chw: Vec<f32> = (0..3 * plane).map(|i| (i % 97) as f32 / 97.0).collect();
    let before = chw.clone();
    let rules = DatasetRules {
        mask: vec![MaskRect {
            x0: 0.7,
            y0: 0.85,
            x1: 1.0,
            y1: 1.0,
        }],
        note: String::new(),
    };
    apply_rules(&rules, &mut chw, size);
    // x 7..10, y 8..10 (edges rounded outwards: 0.85 * 10 = 8.5 -> row 8).
    assert_eq!(rules.mask[0].pixels(size), (7, 8, 10, 10));
    for ch in 0..3 {
        let outside: Vec<f32> = (0..plane)
            .filter(|p| !(p / size >= 8 && p % size >= 7))
            .map(|p| before[ch * plane + p])
            .collect();
        let mut sorted = outside.clone();
        sorted.sort_by(f32::total_cmp);
        let median = sorted[sorted.len() / 2];
        for p in 0..plane {
            let (r, c) = (p / size, p % size);
            let v = chw[ch * plane + p];
            if r >= 8 && c >= 7 {
                assert_eq!(v, median, "ch {ch} r {r} c {c}");
            } else {
                assert_eq!(v, before[ch * plane + p], "ch {ch} r {r} c {c}");
            }
        }
    }
    // Empty rules and a wrong tensor length change nothing.
    let mut same = before.clone();
    apply_rules(&DatasetRules::default(), &mut same, size);
    assert_eq!(same, before);
    let mut short = before[..10].to_vec();
    apply_rules(&rules, &mut short, size);
    assert_eq!(short, before[..10]);
}

#[test]
fn rules_file_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.json");
    write(
        &p,
        br#"{"_comment": "x", "D": {"mask": [{"x0": 0.5, "y0": 0.5, "x1": 1.0, "y1": 1.0}]}}"#,
    );
    let rules = load_rules(&p).unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules["D"].mask.len(), 1);
    write(
        &p,
        br#"{"D": {"mask": [{"x0": 0.5, "y0": 0.5, "x1": 1.5, "y1": 1.0}]}}"#,
    );
    assert!(matches!(load_rules(&p), Err(DataError::InvalidRule { .. })));
    write(
        &p,
        br#"{"D": {"mask": [{"x0": 0.6, "y0": 0.5, "x1": 0.5, "y1": 1.0}]}}"#,
    );
    assert!(matches!(load_rules(&p), Err(DataError::InvalidRule { .. })));
    write(&p, br#"{"D": {"masks": []}}"#);
    assert!(matches!(load_rules(&p), Err(DataError::RulesJson { .. })));
    write(&p, b"[1, 2]");
    assert!(matches!(load_rules(&p), Err(DataError::RulesJson { .. })));
    // The shipped config parses.
    let shipped =
        load_rules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/datasets.json")).unwrap();
    assert!(shipped.contains_key("ALL-Aria2021"));
}

#[test]
fn synthetic_splits_and_batches() {
    // Three both-class sets (one with patients holding both classes), two one-class sets.
    let mut samples = Vec::new();
    let mut id = 0;
    let mut add = |ds: &str, label: u8, patient: Option<String>, n: usize| {
        for _ in 0..n {
            samples.push(sample(ds, label, patient.as_deref(), id));
            id += 1;
        }
    };
    for p in 0..30 {
        add("P", 1, Some(format!("pt{p}")), 1 + p % 4);
        add("P", 0, Some(format!("pt{p}")), 1 + (p + 2) % 3);
    }
    add("A", 1, None, 23);
    add("A", 0, None, 19);
    add("B", 1, None, 11);
    add("B", 0, None, 40);
    add("H1", 0, None, 33);
    add("H2", 0, None, 7);

    let lodo = lodo_splits(&samples);
    let names: Vec<&str> = lodo.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["lodo-P", "lodo-A", "lodo-B"]);

    for k in [2, 3, 5] {
        for seed in [0, 1, 99] {
            let folds = stratified_kfold(&samples, k, seed);
            let mut tested = vec![0; samples.len()];
            for f in &folds {
                assert_partition(samples.len(), &f.train, &f.test);
                assert_no_leak(&samples, &f.train, &f.test);
                f.test.iter().for_each(|&i| tested[i] += 1);
            }
            assert!(tested.iter().all(|&t| t == 1));
            for label in [0, 1] {
                let c: Vec<usize> = folds
                    .iter()
                    .map(|f| {
                        f.test
                            .iter()
                            .filter(|&&i| samples[i].label == label)
                            .count()
                    })
                    .collect();
                assert!(
                    c.iter().max().unwrap() - c.iter().min().unwrap() <= 1,
                    "k {k} seed {seed} label {label}: {c:?}"
                );
            }
        }
    }

    // Inner folds: with outer test A, every training source is held out once; a source whose
    // removal would leave one class (none here) would be skipped.
    let outer = &lodo[1];
    let inner = inner_source_folds(&samples, &outer.train);
    let held: Vec<&str> = inner
        .iter()
        .map(|s| s.test_dataset.as_deref().unwrap())
        .collect();
    assert_eq!(held, ["P", "B", "H1", "H2"]);
    // Only one leukemic source left in training: holding it out would leave no leukemic
    // images, so that fold is skipped.
    let only_b_leukemic: Vec<usize> = (0..samples.len())
        .filter(|&i| matches!(samples[i].dataset.as_str(), "B" | "H1"))
        .collect();
    let inner = inner_source_folds(&samples, &only_b_leukemic);
    let held: Vec<&str> = inner
        .iter()
        .map(|s| s.test_dataset.as_deref().unwrap())
        .collect();
    assert_eq!(held, ["H1"]);
    assert!(inner_source_folds(&samples, &[usize::MAX]).is_empty());

    // Balanced batches: 8 groups, batch 12 -> counts 1 or 2 per group; tiny group H2 repeats.
    let idx: Vec<usize> = (0..samples.len()).collect();
    let batches = balanced_batches(&samples, &idx, 12, 3, 0);
    assert_eq!(batches.len(), samples.len().div_ceil(12));
    let key = |i: usize| (samples[i].dataset.clone(), samples[i].label);
    let groups: HashSet<_> = idx.iter().map(|&i| key(i)).collect();
    for b in &batches {
        let mut per: HashMap<_, usize> = groups.iter().map(|g| (g.clone(), 0)).collect();
        b.iter().for_each(|&i| *per.get_mut(&key(i)).unwrap() += 1);
        assert!(
            per.values().max().unwrap() - per.values().min().unwrap() <= 1,
            "{per:?}"
        );
    }
    assert_eq!(balanced_batches(&samples, &idx, 12, 3, 0), batches);
    assert!(balanced_batches(&samples, &idx, 0, 3, 0).is_empty());
    assert!(balanced_batches(&samples, &[], 12, 3, 0).is_empty());
    // Epoch 5 computed directly equals epoch 5 computed after the others (pure function).
    let e5 = balanced_batches(&samples, &idx, 12, 3, 5);
    assert_eq!(e5, balanced_batches(&samples, &idx, 12, 3, 5));
}
