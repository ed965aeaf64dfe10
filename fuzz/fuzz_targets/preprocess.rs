//! Image decoding and preprocessing (`leuknet::preprocess::preprocess`) on arbitrary bytes,
//! with small limits so that each run is fast: any panic (even one `preprocess` would catch and
//! turn into `Corrupt`), hang or memory blow-up is a finding. On success the tensor must be
//! `3 x size x size` finite values in [0, 1] and the image within the pixel limit.
#![no_main]

use leuknet::preprocess::{preprocess, Limits};
use libfuzzer_sys::fuzz_target;

/// Small output and pixel limit: the server's 224 and 40 MP would only make runs slower.
const SIZE: u32 = 32;
const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_pixels: MAX_PIXELS,
    };
    if let Ok(p) = preprocess(data, SIZE, &limits) {
        assert_eq!(p.tensor.len(), (3 * SIZE * SIZE) as usize);
        assert!(p
            .tensor
            .iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        assert!(p.width > 0 && p.height > 0);
        assert!(u64::from(p.width) * u64::from(p.height) <= MAX_PIXELS);
    }
});
