//! A fast path for the most expensive case of [`super::preprocess`]: a large baseline JPEG
//! decoded at 1/8 scale (both sides >= 8 x the target size, e.g. a 2592x1944 camera frame).
//!
//! At 1/8 scale every 8x8 block becomes one pixel computed from its DC coefficient alone, so
//! the AC coefficients only need to be *skipped*, not reconstructed. jpeg-decoder still
//! reconstructs, stores and hands over all 64 coefficients of every block, which makes it
//! about twice as slow as libjpeg-turbo here. This module parses the file itself, walks the
//! Huffman-coded data keeping only the DC values, and then reproduces jpeg-decoder 0.3's own
//! arithmetic for the rest: its 1x1 IDCT `(dc * q + 1024) / 8`, its chroma upsamplers and its
//! YCbCr -> RGB conversion (including the SSSE3 variant it uses on x86 for most of each row).
//! The result is therefore **byte-identical** to jpeg-decoder's, so the model card's
//! description of the preprocessing stays true; `tests/preprocess.rs` checks this on real
//! and generated images.
//!
//! It is deliberately narrow: baseline or extended sequential Huffman JPEG, 8-bit, one
//! component (gray, sampling 1x1) or three (YCbCr, any sampling jpeg-decoder accepts), one
//! interleaved scan, restart markers allowed, no Adobe/AVI1 markers. Anything else, and any
//! irregularity in the data (an invalid Huffman code, a truncated scan, a marker out of
//! place, an EOB run, ...), makes [`decode_dc_only`] return `None`, and the caller decodes
//! the file with jpeg-decoder as before, so errors and odd files behave exactly as they did.
//!
//! The upsampling and colour-conversion code follows jpeg-decoder 0.3.2
//! (`src/upsampler.rs`, `src/decoder.rs`, `src/arch/ssse3.rs`; MIT OR Apache-2.0).

use super::Pixels;

/// Bits looked up at once when decoding a Huffman symbol.
const LUT_BITS: u32 = 10;

/// The `run + 1` that an end of block adds to the position in [`Huffman::skip`] entries and
/// the slow path: it lifts the position past [`AC_END_OF_BLOCK`].
const AC_EOB_ADVANCE: u32 = 128;
/// Positions at or past this after a block mean it ended with an EOB.
const AC_END_OF_BLOCK: u32 = 128;
/// Bits looked up at once when skipping AC coefficients (several per lookup).
const SKIP_BITS: u32 = 12;

/// One Huffman table: lookup tables for short codes, the canonical-code limits for long ones.
struct Huffman {
    /// For each `LUT_BITS`-bit prefix: `symbol | code_length << 8`, or 0 for longer codes.
    lut: Box<[u16; 1 << LUT_BITS]>,
    /// For each [`SKIP_BITS`]-bit prefix: as many whole AC coefficients (code and extra
    /// bits, possibly ending with an EOB) as it holds, ready to skip in one step: bits to
    /// drop (bits 0..8), how far the position moves (sum of `run + 1`, plus
    /// [`AC_EOB_ADVANCE`] for a final EOB; bits 8..16) and the largest position the step may
    /// start from without running past the block's end (bits 16..24; 0 = never: the prefix
    /// starts with a long code, sixteen zeros or an EOB run). Built for AC tables only.
    skip: Option<Box<[u32; 1 << SKIP_BITS]>>,
    /// Largest code of each length (index = length - 1), -1 when there is none.
    maxcode: [i32; 16],
    /// `index of the first value of that length - first code of that length`.
    delta: [i32; 16],
    values: Vec<u8>,
}

impl Huffman {
    /// Builds the table from a DHT's 16 counts and its values, as jpeg-decoder does; `None`
    /// when the lengths do not form a prefix code (jpeg-decoder refuses those too).
    fn new(counts: &[u8; 16], values: &[u8]) -> Option<Self> {
        let mut lut = Box::new([0u16; 1 << LUT_BITS]);
        let mut maxcode = [-1i32; 16];
        let mut delta = [0i32; 16];
        let mut code: u32 = 0;
        let mut k = 0usize;
        for (i, &count) in counts.iter().enumerate() {
            let len = i as u32 + 1;
            if count > 0 {
                delta[i] = k as i32 - code as i32;
                for _ in 0..count {
                    if code >= 1 << len {
                        return None;
                    }
                    if len <= LUT_BITS {
                        let shift = LUT_BITS - len;
                        let start = (code << shift) as usize;
                        let entry = u16::from(*values.get(k)?) | (len as u16) << 8;
                        lut[start..start + (1 << shift)].fill(entry);
                    }
                    code += 1;
                    k += 1;
                }
                maxcode[i] = code as i32 - 1;
            }
            code <<= 1;
        }
        Some(Huffman {
            lut,
            skip: None,
            maxcode,
            delta,
            values: values.to_vec(),
        })
    }

    /// The symbol whose canonical code of a length in `lengths` starts the 16 left-aligned
    /// bits `bits16`, with that length; `None` when no code of those lengths does (checked in
    /// increasing length, as JPEG F.2.2.3 decodes).
    fn canonical(&self, bits16: u32, lengths: std::ops::RangeInclusive<u32>) -> Option<(u8, u32)> {
        for len in lengths {
            let code = (bits16 >> (16 - len)) as i32;
            if code <= self.maxcode[len as usize - 1] {
                let index = (code + self.delta[len as usize - 1]) as usize;
                return Some((*self.values.get(index)?, len));
            }
        }
        None
    }

    /// Adds the [`Huffman::skip`] table (for an AC table).
    fn with_skip_table(mut self) -> Self {
        let mask = (1u32 << SKIP_BITS) - 1;
        let mut skip = Box::new([0u32; 1 << SKIP_BITS]);
        for (prefix, entry) in skip.iter_mut().enumerate() {
            let (mut used, mut advance) = (0u32, 0u32);
            while used < SKIP_BITS {
                let window = ((prefix as u32) << used) & mask;
                let avail = SKIP_BITS - used;
                let Some((rs, len)) = self.canonical(window << (16 - SKIP_BITS), 1..=avail) else {
                    break;
                };
                let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
                if s == 0 {
                    // An EOB ends the step (if the block may still hold one: position < 64);
                    // sixteen zeros and EOB runs go the slow way.
                    if r == 0 && advance < 63 {
                        *entry =
                            (used + len) | (advance + AC_EOB_ADVANCE) << 8 | (63 - advance) << 16;
                    }
                    break;
                }
                if used + len + s > SKIP_BITS || advance + r + 1 > 63 {
                    break;
                }
                used += len + s;
                advance += r + 1;
                *entry = used | advance << 8 | (64 - advance) << 16;
            }
        }
        self.skip = Some(skip);
        self
    }
}

/// Reads the entropy-coded data of a scan: removes stuffed zero bytes, stops at a marker.
/// (Copy, and the cold paths take it by value, so that its fields stay in registers.)
#[derive(Clone, Copy)]
struct BitReader<'a> {
    data: &'a [u8],
    /// Next byte to load.
    pos: usize,
    /// Loaded bits, left-aligned.
    bits: u64,
    nbits: u32,
    /// Position of the 0xFF that starts the marker ending the data, once reached.
    marker_at: Option<usize>,
    /// Zero bits appended after the marker was reached (data consumed from there is invalid).
    padding: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            bits: 0,
            nbits: 0,
            marker_at: None,
            padding: 0,
        }
    }

    /// Loads bytes until at least 56 bits are held. Fast path, without a data-dependent
    /// branch: when none of the next eight bytes is 0xFF, OR them in after the held bits and
    /// advance by the whole bytes that fitted (the partial byte is ORed in again, identically,
    /// next time). Otherwise byte by byte: unstuffing 0xFF 0x00, stopping at a marker, then
    /// padding with zeros.
    #[inline(always)]
    fn refill(&mut self) {
        if let Some(chunk) = self.data.get(self.pos..self.pos + 8) {
            let word = u64::from_be_bytes(chunk.try_into().unwrap_or([0xFF; 8]));
            let inverted = !word;
            // A zero byte in `inverted` is a 0xFF byte in `word`.
            let has_ff =
                inverted.wrapping_sub(0x0101_0101_0101_0101) & word & 0x8080_8080_8080_8080;
            if has_ff == 0 && self.marker_at.is_none() {
                self.bits |= word >> self.nbits;
                self.pos += ((63 - self.nbits) >> 3) as usize;
                self.nbits |= 56;
                return;
            }
        }
        *self = self.refill_slow();
    }

    #[cold]
    #[inline(never)]
    fn refill_slow(mut self) -> Self {
        // Drop the partial byte the fast path may have left after the held bits.
        self.bits = if self.nbits == 0 {
            0
        } else {
            self.bits & (u64::MAX << (64 - self.nbits))
        };
        // Up to 63 bits (never 64: the fast path shifts by the count held).
        while self.nbits <= 55 {
            let byte = if self.marker_at.is_some() {
                self.padding += 8;
                0
            } else {
                match self.data.get(self.pos) {
                    None => {
                        self.marker_at = Some(self.pos);
                        self.padding += 8;
                        0
                    }
                    Some(&0xFF) => match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            self.pos += 2;
                            0xFF
                        }
                        _ => {
                            self.marker_at = Some(self.pos);
                            self.padding += 8;
                            0
                        }
                    },
                    Some(&b) => {
                        self.pos += 1;
                        b
                    }
                }
            };
            self.bits |= u64::from(byte) << (56 - self.nbits);
            self.nbits += 8;
        }
        self
    }

    #[inline]
    fn peek(&self, n: u32) -> u32 {
        (self.bits >> (64 - n)) as u32
    }

    /// Drops `n` bits (at most the number held).
    #[inline]
    fn consume(&mut self, n: u32) {
        self.bits <<= n;
        self.nbits -= n;
    }

    /// Decodes one symbol; the caller has made sure at least 32 bits are loaded.
    #[inline(always)]
    fn symbol(&mut self, table: &Huffman) -> Option<(u8, u32)> {
        let entry = table.lut[self.peek(LUT_BITS) as usize];
        if entry != 0 {
            return Some(((entry & 0xFF) as u8, u32::from(entry >> 8)));
        }
        long_symbol(self.bits, table)
    }

    /// True when no bit consumed so far came from the zero padding after the data's end.
    fn consumed_only_data(&self) -> bool {
        self.padding <= self.nbits
    }

    /// The byte position right after the data consumed so far, provided that what is left
    /// of the current byte is padding and the data ends there (at a marker). `None` otherwise.
    fn end_of_segment(&mut self) -> Option<usize> {
        if !self.consumed_only_data() {
            return None;
        }
        // Bits still held that came from real data: must be fewer than 8 (the last byte's
        // padding) for the segment to end right here.
        let data_bits = self.nbits - self.padding;
        if data_bits >= 8 {
            return None;
        }
        match self.marker_at {
            Some(at) => Some(at),
            None => {
                // The marker has not been reached yet: the next byte must start it.
                (self.data.get(self.pos) == Some(&0xFF)
                    && self.data.get(self.pos + 1) != Some(&0x00))
                .then_some(self.pos)
            }
        }
    }
}

/// A symbol whose code is longer than [`LUT_BITS`] (or invalid: `None`), from the reader's
/// left-aligned bits.
#[cold]
#[inline(never)]
fn long_symbol(bits: u64, table: &Huffman) -> Option<(u8, u32)> {
    table.canonical((bits >> 48) as u32, LUT_BITS + 1..=16)
}

/// `extend` of JPEG F.2.2.1 on the low `s` bits of `v` (1 <= s <= 11).
#[inline]
fn extend(v: u32, s: u32) -> i16 {
    let v = v as i32;
    if v < 1 << (s - 1) {
        (v - (1 << s) + 1) as i16
    } else {
        v as i16
    }
}

/// One frame component, as the SOF declares it.
#[derive(Clone, Copy)]
struct Component {
    id: u8,
    h: u8,
    v: u8,
    tq: u8,
}

fn be16(bytes: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(*bytes.get(at)?) << 8 | usize::from(*bytes.get(at + 1)?))
}

/// Decodes a baseline JPEG at 1/8 scale from its DC coefficients, byte-identical to
/// jpeg-decoder 0.3 with `scale` to 1/8. Returns `(width, height, pixels)` of the 1/8 image,
/// or `None` when the file is outside the fast path (see the module documentation): the
/// caller must then decode it with jpeg-decoder.
pub(super) fn decode_dc_only(bytes: &[u8]) -> Option<(u32, u32, Pixels)> {
    if bytes.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut pos = 2;
    let mut qt: [Option<u16>; 4] = [None; 4]; // DC entry of each quantisation table
    let mut dc_tables: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac_tables: [Option<Huffman>; 4] = [None, None, None, None];
    let mut restart_interval = 0usize;
    let mut frame: Option<(usize, usize, Vec<Component>, bool)> = None;
    loop {
        // jpeg-decoder skips anything up to the next 0xFF, then fill bytes.
        while *bytes.get(pos)? != 0xFF {
            pos += 1;
        }
        while *bytes.get(pos)? == 0xFF {
            pos += 1;
        }
        let marker = *bytes.get(pos)?;
        pos += 1;
        if marker == 0x00 {
            continue;
        }
        // Markers without a length (TEM, RSTn, SOI, EOI) have no place before the scan.
        if matches!(marker, 0x01 | 0xD0..=0xD9) {
            return None;
        }
        let len = be16(bytes, pos)?;
        if len < 2 {
            return None;
        }
        let body = bytes.get(pos + 2..pos + len)?;
        pos += len;
        match marker {
            // SOF0 (baseline) and SOF1 (extended sequential), Huffman.
            0xC0 | 0xC1 => {
                if frame.is_some() || body.len() < 6 || body[0] != 8 {
                    return None;
                }
                let height = be16(body, 1)?;
                let width = be16(body, 3)?;
                let n = usize::from(body[5]);
                if width == 0 || height == 0 || !(n == 1 || n == 3) || body.len() != 6 + 3 * n {
                    return None;
                }
                let components: Vec<Component> = body[6..]
                    .chunks_exact(3)
                    .map(|c| Component {
                        id: c[0],
                        h: c[1] >> 4,
                        v: c[1] & 15,
                        tq: c[2],
                    })
                    .collect();
                if components
                    .iter()
                    .any(|c| !(1..=4).contains(&c.h) || !(1..=4).contains(&c.v) || c.tq > 3)
                {
                    return None;
                }
                frame = Some((width, height, components, marker == 0xC0));
            }
            // Other SOFn: progressive, lossless, hierarchical, arithmetic.
            0xC2..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            0xC4 => {
                // DHT: one or more tables.
                let baseline = frame.as_ref().map(|f| f.3);
                let mut rest = body;
                while rest.len() > 17 {
                    let (class, index) = (rest[0] >> 4, usize::from(rest[0] & 15));
                    if class > 1 || index > 3 || (baseline == Some(true) && index > 1) {
                        return None;
                    }
                    let counts: [u8; 16] = rest[1..17].try_into().ok()?;
                    let size: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    if size == 0 || size > 256 || size > rest.len() - 17 {
                        return None;
                    }
                    let table = Huffman::new(&counts, &rest[17..17 + size])?;
                    if class == 0 {
                        dc_tables[index] = Some(table);
                    } else {
                        ac_tables[index] = Some(table.with_skip_table());
                    }
                    rest = &rest[17 + size..];
                }
                if !rest.is_empty() {
                    return None;
                }
            }
            0xDB => {
                // DQT: one or more tables, 8- or 16-bit.
                let mut rest = body;
                while !rest.is_empty() {
                    let (precision, index) = (usize::from(rest[0] >> 4), usize::from(rest[0] & 15));
                    if precision > 1 || index > 3 || rest.len() < 65 + 64 * precision {
                        return None;
                    }
                    let values = &rest[1..65 + 64 * precision];
                    let entries: Vec<u16> = if precision == 0 {
                        values.iter().map(|&v| u16::from(v)).collect()
                    } else {
                        values
                            .chunks_exact(2)
                            .map(|c| u16::from(c[0]) << 8 | u16::from(c[1]))
                            .collect()
                    };
                    if entries.contains(&0) {
                        return None;
                    }
                    qt[index] = Some(entries[0]);
                    rest = &rest[65 + 64 * precision..];
                }
            }
            0xDD => {
                if body.len() != 2 {
                    return None;
                }
                restart_interval = be16(body, 0)?;
            }
            0xFE => {} // COM
            0xE0..=0xEF => {
                // APPn: only before the frame header (jpeg-decoder's read_info has checked
                // those); Adobe (colour transform) and AVI1 (default tables) are not handled.
                if frame.is_some() {
                    return None;
                }
                if marker == 0xE0 && body.starts_with(b"AVI1\0") {
                    return None;
                }
                if marker == 0xEE && body.starts_with(b"Adobe") {
                    return None;
                }
            }
            0xDA => {
                let (width, height, components, baseline) = frame?;
                let tables = Tables {
                    qt,
                    dc: dc_tables,
                    ac: ac_tables,
                    baseline,
                };
                return decode_scan(
                    bytes,
                    pos,
                    body,
                    (width, height),
                    &components,
                    &tables,
                    restart_interval,
                );
            }
            _ => return None,
        }
    }
}

/// The tables in force when the scan starts.
struct Tables {
    /// DC entry of each quantisation table.
    qt: [Option<u16>; 4],
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    /// SOF0: only tables 0 and 1 may be used.
    baseline: bool,
}

/// Decodes the scan whose header is `sos` and whose data start at `data_start`; see
/// [`decode_dc_only`]. (Three components without an Adobe marker are YCbCr for jpeg-decoder,
/// whatever their ids, except the ids of RGB and big-gamut files, refused below.)
fn decode_scan(
    bytes: &[u8],
    data_start: usize,
    sos: &[u8],
    (width, height): (usize, usize),
    components: &[Component],
    tables: &Tables,
    restart_interval: usize,
) -> Option<(u32, u32, Pixels)> {
    let n = components.len();
    // The scan must hold every component, in frame order, with full spectral range.
    if sos.len() != 4 + 2 * n || usize::from(sos[0]) != n {
        return None;
    }
    let mut dc: Vec<&Huffman> = Vec::with_capacity(n);
    let mut ac: Vec<(&Huffman, &[u32; 1 << SKIP_BITS])> = Vec::with_capacity(n);
    let mut q: Vec<i32> = Vec::with_capacity(n);
    for (i, c) in components.iter().enumerate() {
        let (id, selectors) = (sos[1 + 2 * i], sos[2 + 2 * i]);
        if id != c.id {
            return None;
        }
        let (td, ta) = (usize::from(selectors >> 4), usize::from(selectors & 15));
        if tables.baseline && (td > 1 || ta > 1) {
            return None;
        }
        dc.push(tables.dc.get(td)?.as_ref()?);
        let table = tables.ac.get(ta)?.as_ref()?;
        ac.push((table, table.skip.as_deref()?));
        q.push(i32::from(tables.qt[usize::from(c.tq)]?));
    }
    let tail = &sos[1 + 2 * n..];
    if tail != [0, 63, 0] {
        return None;
    }
    if n == 3 {
        match (components[0].id, components[1].id, components[2].id) {
            // RGB, big-gamut YCC/RGB: other conversions in jpeg-decoder.
            (82, 71, 66) | (1, 34, 35) | (114, 103, 98) => return None,
            _ => {}
        }
    } else if components[0].h != 1 || components[0].v != 1 {
        return None;
    }

    let h_max = components.iter().map(|c| usize::from(c.h)).max()?;
    let v_max = components.iter().map(|c| usize::from(c.v)).max()?;
    if components
        .iter()
        .any(|c| h_max % usize::from(c.h) != 0 || v_max % usize::from(c.v) != 0)
    {
        return None;
    }
    let (mcus_x, mcus_y) = if n == 1 {
        (width.div_ceil(8), height.div_ceil(8))
    } else {
        (width.div_ceil(8 * h_max), height.div_ceil(8 * v_max))
    };
    if n > 1
        && components
            .iter()
            .map(|c| usize::from(c.h) * usize::from(c.v))
            .sum::<usize>()
            > 10
    {
        return None;
    }
    // Per component: the 1/8 plane, one byte per block, row stride = blocks per row.
    let strides: Vec<usize> = components
        .iter()
        .map(|c| mcus_x * usize::from(c.h))
        .collect();
    let mut planes: Vec<Vec<u8>> = components
        .iter()
        .zip(&strides)
        .map(|(c, &s)| vec![0u8; s * mcus_y * usize::from(c.v)])
        .collect();

    // The blocks of one MCU in stream order: (component, block row, block column).
    let h_blocks: Vec<usize> = components
        .iter()
        .map(|c| if n == 1 { 1 } else { usize::from(c.h) })
        .collect();
    let v_blocks: Vec<usize> = components
        .iter()
        .map(|c| if n == 1 { 1 } else { usize::from(c.v) })
        .collect();
    let mut mcu_blocks: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..n {
        for row in 0..v_blocks[i] {
            for col in 0..h_blocks[i] {
                mcu_blocks.push((i, row, col));
            }
        }
    }

    let mut reader = BitReader::new(bytes, data_start);
    let mut pred = [0i16; 3];
    let mut left_in_interval = restart_interval;
    let mut expected_rst = 0u8;
    for mcu_y in 0..mcus_y {
        for mcu_x in 0..mcus_x {
            if restart_interval > 0 {
                if left_in_interval == 0 {
                    let at = reader.end_of_segment()?;
                    let mut p = at;
                    while bytes.get(p) == Some(&0xFF) {
                        p += 1;
                    }
                    if *bytes.get(p)? != 0xD0 + expected_rst {
                        return None;
                    }
                    reader = BitReader::new(bytes, p + 1);
                    pred = [0; 3];
                    expected_rst = (expected_rst + 1) % 8;
                    left_in_interval = restart_interval;
                }
                left_in_interval -= 1;
            }
            for &(i, row, col) in &mcu_blocks {
                // DC
                reader.refill();
                let (s, len) = reader.symbol(dc[i])?;
                let s = u32::from(s);
                if s > 11 {
                    return None;
                }
                let diff = if s == 0 {
                    0
                } else {
                    extend(reader.peek(len + s) & ((1 << s) - 1), s)
                };
                reader.consume(len + s);
                pred[i] = pred[i].wrapping_add(diff);
                // AC: skipped, but walked exactly as jpeg-decoder walks it.
                let (table, skip) = ac[i];
                let mut k = 1u32;
                while k < 64 {
                    reader.refill();
                    let entry = skip[reader.peek(SKIP_BITS) as usize];
                    if k <= entry >> 16 {
                        reader.consume(entry & 0xFF);
                        k += (entry >> 8) & 0xFF;
                        continue;
                    }
                    let (rs, len) = reader.symbol(table)?;
                    let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
                    if s == 0 {
                        match r {
                            // Sixteen zeros (may run past the end: jpeg-decoder then just
                            // ends the block).
                            15 => {
                                reader.consume(len);
                                k = (k + 16).min(64);
                                continue;
                            }
                            0 => {
                                reader.consume(len);
                                k += AC_EOB_ADVANCE;
                                break;
                            }
                            _ => return None, // an EOB run: not baseline
                        }
                    }
                    k += r;
                    if k > 63 {
                        return None;
                    }
                    reader.consume(len + s);
                    k += 1;
                }
                // A coefficient past the end of the block (65..=79; an EOB lands at 129 or
                // more, sixteen zeros past the end stop at 64 in the slow path above).
                if k > 64 && k < AC_END_OF_BLOCK {
                    return None;
                }
                // 1x1 IDCT, as jpeg-decoder: (dc * q + 128 * 8) / 8, clamped.
                let v = i32::from(pred[i])
                    .wrapping_mul(q[i])
                    .wrapping_add(1024)
                    .wrapping_div(8)
                    .clamp(0, 255) as u8;
                let at = (mcu_y * v_blocks[i] + row) * strides[i] + mcu_x * h_blocks[i] + col;
                planes[i][at] = v;
            }
        }
    }
    // The scan must end here: padding bits, then a marker; RSTs may follow; then EOI.
    let mut p = reader.end_of_segment()?;
    loop {
        while bytes.get(p) == Some(&0xFF) {
            p += 1;
        }
        match *bytes.get(p)? {
            0xD0..=0xD7 => {
                p += 1;
                // jpeg-decoder's read_marker: skip to the next 0xFF.
                while *bytes.get(p)? != 0xFF {
                    p += 1;
                }
            }
            0xD9 => break,
            _ => return None,
        }
    }
    if !reader.consumed_only_data() {
        return None;
    }

    let out_w = width.div_ceil(8);
    let out_h = height.div_ceil(8);
    if n == 1 {
        let mut gray = Vec::with_capacity(out_w * out_h);
        for row in planes[0].chunks_exact(strides[0]).take(out_h) {
            gray.extend_from_slice(&row[..out_w]);
        }
        return Some((out_w as u32, out_h as u32, Pixels::Gray(gray)));
    }
    let rgb = upsample_and_convert(components, &planes, &strides, width, height, out_w, out_h);
    Some((out_w as u32, out_h as u32, Pixels::Rgb(rgb)))
}

/// jpeg-decoder's `compute_image` for three components at 1/8 scale: per output row,
/// upsample each component's row into a line buffer, then convert YCbCr to RGB.
fn upsample_and_convert(
    components: &[Component],
    planes: &[Vec<u8>],
    strides: &[usize],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let h_max = components
        .iter()
        .map(|c| usize::from(c.h))
        .max()
        .unwrap_or(1);
    let v_max = components
        .iter()
        .map(|c| usize::from(c.v))
        .max()
        .unwrap_or(1);
    // Component sizes at 1/8 scale (jpeg-decoder's update_component_sizes with dct_scale 1).
    let sizes: Vec<(usize, usize)> = components
        .iter()
        .map(|c| {
            (
                (width * usize::from(c.h)).div_ceil(h_max * 8),
                (height * usize::from(c.v)).div_ceil(v_max * 8),
            )
        })
        .collect();
    let kinds: Vec<Upsample> = components
        .iter()
        .map(|c| {
            let h1 = usize::from(c.h) == h_max || out_w == 1;
            let v1 = usize::from(c.v) == v_max || out_h == 1;
            let h2 = usize::from(c.h) * 2 == h_max;
            let v2 = usize::from(c.v) * 2 == v_max;
            match (h1, v1, h2, v2) {
                (true, true, _, _) => Upsample::H1V1,
                (_, true, true, _) => Upsample::H2V1,
                (true, _, _, true) => Upsample::H1V2,
                (_, _, true, true) => Upsample::H2V2,
                _ => Upsample::Generic(h_max / usize::from(c.h), v_max / usize::from(c.v)),
            }
        })
        .collect();
    let line_len = sizes.iter().map(|s| s.0).max().unwrap_or(0) * h_max;
    let mut lines = vec![vec![0u8; line_len]; 3];
    let mut rgb = vec![0u8; out_w * out_h * 3];
    let simd = ssse3_available();
    for (row, out) in rgb.chunks_exact_mut(out_w * 3).enumerate() {
        for i in 0..3 {
            upsample_row(
                kinds[i],
                &planes[i],
                sizes[i],
                strides[i],
                row,
                out_w,
                &mut lines[i],
            );
        }
        ycbcr_row(&lines[0], &lines[1], &lines[2], out, simd);
    }
    rgb
}

#[derive(Clone, Copy)]
enum Upsample {
    H1V1,
    H2V1,
    H1V2,
    H2V2,
    /// Nearest neighbour by (horizontal, vertical) integer factors.
    Generic(usize, usize),
}

/// jpeg-decoder's `Upsample::upsample_row` for each upsampler kind.
fn upsample_row(
    kind: Upsample,
    input: &[u8],
    (input_width, input_height): (usize, usize),
    row_stride: usize,
    row: usize,
    output_width: usize,
    output: &mut [u8],
) {
    match kind {
        Upsample::H1V1 => {
            let input = &input[row * row_stride..];
            output[..output_width].copy_from_slice(&input[..output_width]);
        }
        Upsample::H2V1 => {
            let input = &input[row * row_stride..];
            if input_width == 1 {
                output[0] = input[0];
                output[1] = input[0];
                return;
            }
            output[0] = input[0];
            output[1] = ((u32::from(input[0]) * 3 + u32::from(input[1]) + 2) >> 2) as u8;
            for i in 1..input_width - 1 {
                let sample = 3 * u32::from(input[i]) + 2;
                output[i * 2] = ((sample + u32::from(input[i - 1])) >> 2) as u8;
                output[i * 2 + 1] = ((sample + u32::from(input[i + 1])) >> 2) as u8;
            }
            let last = input_width - 1;
            output[last * 2] =
                ((u32::from(input[last]) * 3 + u32::from(input[last - 1]) + 2) >> 2) as u8;
            output[last * 2 + 1] = input[last];
        }
        Upsample::H1V2 => {
            let (near, far) = vertical_neighbours(row, input_height);
            let input_near = &input[near * row_stride..][..output_width];
            let input_far = &input[far * row_stride..][..output_width];
            for ((o, &a), &b) in output[..output_width]
                .iter_mut()
                .zip(input_near)
                .zip(input_far)
            {
                *o = ((3 * u32::from(a) + u32::from(b) + 2) >> 2) as u8;
            }
        }
        Upsample::H2V2 => {
            let (near, far) = vertical_neighbours(row, input_height);
            let input_near = &input[near * row_stride..];
            let input_far = &input[far * row_stride..];
            if input_width == 1 {
                let value =
                    ((3 * u32::from(input_near[0]) + u32::from(input_far[0]) + 2) >> 2) as u8;
                output[0] = value;
                output[1] = value;
                return;
            }
            let mut t1 = 3 * u32::from(input_near[0]) + u32::from(input_far[0]);
            output[0] = ((t1 + 2) >> 2) as u8;
            for i in 1..input_width {
                let t0 = t1;
                t1 = 3 * u32::from(input_near[i]) + u32::from(input_far[i]);
                output[i * 2 - 1] = ((3 * t0 + t1 + 8) >> 4) as u8;
                output[i * 2] = ((3 * t1 + t0 + 8) >> 4) as u8;
            }
            output[input_width * 2 - 1] = ((t1 + 2) >> 2) as u8;
        }
        Upsample::Generic(hf, vf) => {
            let start = (row / vf) * row_stride;
            let mut index = 0;
            for &val in &input[start..start + input_width] {
                for _ in 0..hf {
                    output[index] = val;
                    index += 1;
                }
            }
        }
    }
}

/// The two input rows jpeg-decoder's vertical "fancy" upsamplers blend for output `row`
/// (computed in f32 exactly as it does).
fn vertical_neighbours(row: usize, input_height: usize) -> (usize, usize) {
    let row_near = row as f32 / 2.0;
    let row_far = (row_near + row_near.fract() * 3.0 - 0.25).min((input_height - 1) as f32);
    (row_near as usize, row_far as usize)
}

/// Whether jpeg-decoder converts colours with its SSSE3 routine on this CPU.
fn ssse3_available() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// One row of YCbCr -> RGB as jpeg-decoder converts it: with SSSE3, the first
/// `(n / 8 - 1) * 8` pixels by its 16-bit fixed-point vector routine (reproduced here lane by
/// lane), the rest by its 20-bit scalar formula.
fn ycbcr_row(y: &[u8], cb: &[u8], cr: &[u8], out: &mut [u8], simd: bool) {
    let n = out.len() / 3;
    let vector_pixels = if simd {
        (n / 8).saturating_sub(1) * 8
    } else {
        0
    };
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        let rgb = if i < vector_pixels {
            ycbcr_ssse3(y[i], cb[i], cr[i])
        } else {
            ycbcr_scalar(y[i], cb[i], cr[i])
        };
        px.copy_from_slice(&rgb);
    }
}

/// jpeg-decoder's scalar `ycbcr_to_rgb` (20-bit fixed point).
fn ycbcr_scalar(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    const SHIFT: i32 = 20;
    const HALF: i32 = 1 << (SHIFT - 1);
    fn f2f(x: f32) -> i32 {
        (x * ((1 << SHIFT) as f32) + 0.5) as i32
    }
    fn clamp(v: i32) -> u8 {
        (v >> SHIFT).clamp(0, 255) as u8
    }
    let y = i32::from(y) * (1 << SHIFT) + HALF;
    let cb = i32::from(cb) - 128;
    let cr = i32::from(cr) - 128;
    [
        clamp(y + f2f(1.40200) * cr),
        clamp(y - f2f(0.34414) * cb - f2f(0.71414) * cr),
        clamp(y + f2f(1.77200) * cb),
    ]
}

/// One lane of jpeg-decoder's SSSE3 `color_convert_line_ycbcr` (16-bit lanes, 6 fraction
/// bits, `_mm_mulhrs_epi16` products, saturating adds).
fn ycbcr_ssse3(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    const SHIFT: i32 = 6;
    fn sat(v: i32) -> i32 {
        v.clamp(i32::from(i16::MIN), i32::from(i16::MAX))
    }
    fn mulhrs(a: i32, b: i32) -> i32 {
        (((a * b) >> 14) + 1) >> 1
    }
    fn pack(v: i32) -> u8 {
        (v >> SHIFT).clamp(0, 255) as u8
    }
    let y = sat((i32::from(y) << SHIFT) + (1 << SHIFT >> 1));
    let cb = sat((i32::from(cb) << SHIFT) - (128 << SHIFT));
    let cr = sat((i32::from(cr) << SHIFT) - (128 << SHIFT));
    let cr_140200 = sat(mulhrs(cr, 13173) + cr);
    let cb_034414 = mulhrs(cb, 11276);
    let cr_071414 = mulhrs(cr, 23401);
    let cb_177200 = sat(mulhrs(cb, 25297) + cb);
    let r = sat(y + cr_140200);
    let g = sat(y - sat(cb_034414 + cr_071414));
    let b = sat(y + cb_177200);
    [pack(r), pack(g), pack(b)]
}

#[cfg(test)]
mod tests {
    //! The fast path against jpeg-decoder itself on generated baseline JPEGs: random DC and AC
    //! coefficients under every sampling layout jpeg-decoder upsamples, gray, restart
    //! intervals, long Huffman codes, 8- and 16-bit quantisation tables; then the same files
    //! with random bytes changed, where the fast path must either decline or agree.

    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// jpeg-decoder at 1/8 scale.
    fn reference(bytes: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
        let mut d = jpeg_decoder::Decoder::new(bytes);
        d.read_info().ok()?;
        d.scale(1, 1).ok()?;
        let data = d
            .decode()
            .map_err(|e| eprintln!("jpeg-decoder: {e}"))
            .ok()?;
        let info = d.info()?;
        Some((u32::from(info.width), u32::from(info.height), data))
    }

    fn fast(bytes: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
        let (w, h, pixels) = decode_dc_only(bytes)?;
        let data = match pixels {
            Pixels::Gray(v) | Pixels::Rgb(v) => v,
        };
        Some((w, h, data))
    }

    /// Canonical codes for `counts` (lengths 1..=16) in value order, as (code, length).
    fn codes(counts: &[u8; 16]) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut code = 0u32;
        for (i, &c) in counts.iter().enumerate() {
            for _ in 0..c {
                out.push((code, i as u32 + 1));
                code += 1;
            }
            code <<= 1;
        }
        out
    }

    /// DC table: categories 0..=11, one 12-bit code (past the lookup table).
    const DC_COUNTS: [u8; 16] = [0, 1, 3, 3, 2, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0];
    /// AC table over all 162 baseline symbols, many codes longer than the lookup table.
    const AC_COUNTS: [u8; 16] = [0, 1, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 20, 21];

    fn ac_symbols() -> Vec<u8> {
        let mut v = vec![0x00, 0x01, 0x02, 0x11, 0xF0, 0x03, 0x21];
        for r in 0..16u8 {
            for s in 1..=10u8 {
                let sym = r << 4 | s;
                if !v.contains(&sym) {
                    v.push(sym);
                }
            }
        }
        assert_eq!(v.len(), 162);
        v
    }

    struct Writer {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }

    impl Writer {
        fn bits(&mut self, value: u32, len: u32) {
            if len == 0 {
                return;
            }
            self.acc = self.acc << len | u64::from(value & ((1 << len) - 1));
            self.n += len;
            while self.n >= 8 {
                let byte = (self.acc >> (self.n - 8)) as u8;
                self.out.push(byte);
                if byte == 0xFF {
                    self.out.push(0);
                }
                self.n -= 8;
            }
        }
        fn pad(&mut self) {
            let fill = (8 - self.n % 8) % 8;
            self.bits((1 << fill) - 1, fill);
        }
    }

    fn segment(out: &mut Vec<u8>, marker: u8, body: &[u8]) {
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
    }

    /// A random baseline JPEG: `sampling` per component (one entry = gray).
    fn synthetic(
        rng: &mut StdRng,
        width: u16,
        height: u16,
        sampling: &[(u8, u8)],
        restart: u16,
    ) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        segment(&mut out, 0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        // Two quantisation tables: 8-bit and 16-bit.
        let mut dqt = vec![0x00];
        dqt.extend((0..64).map(|_| rng.random_range(1..=255u8)));
        dqt.push(0x11);
        for _ in 0..64 {
            dqt.extend_from_slice(&rng.random_range(1..=600u16).to_be_bytes());
        }
        segment(&mut out, 0xDB, &dqt);
        let mut sof = vec![8];
        sof.extend_from_slice(&height.to_be_bytes());
        sof.extend_from_slice(&width.to_be_bytes());
        sof.push(sampling.len() as u8);
        for (i, &(h, v)) in sampling.iter().enumerate() {
            sof.extend_from_slice(&[i as u8 + 1, h << 4 | v, u8::from(i > 0)]);
        }
        segment(&mut out, 0xC0, &sof);
        let dc_values: Vec<u8> = (0..12).collect();
        let ac_values = ac_symbols();
        let mut dht = Vec::new();
        for (class_index, counts, values) in [
            (0x00, &DC_COUNTS, &dc_values),
            (0x10, &AC_COUNTS, &ac_values),
            (0x01, &DC_COUNTS, &dc_values),
            (0x11, &AC_COUNTS, &ac_values),
        ] {
            dht.push(class_index);
            dht.extend_from_slice(counts);
            dht.extend_from_slice(values);
        }
        segment(&mut out, 0xC4, &dht);
        if restart > 0 {
            segment(&mut out, 0xDD, &restart.to_be_bytes());
        }
        let mut sos = vec![sampling.len() as u8];
        for i in 0..sampling.len() {
            sos.extend_from_slice(&[i as u8 + 1, if i == 0 { 0x00 } else { 0x11 }]);
        }
        sos.extend_from_slice(&[0, 63, 0]);
        segment(&mut out, 0xDA, &sos);

        let dc_codes = codes(&DC_COUNTS);
        let ac_codes = codes(&AC_COUNTS);
        let ac_index = |sym: u8| ac_values.iter().position(|&v| v == sym).unwrap();
        let h_max = sampling.iter().map(|s| u32::from(s.0)).max().unwrap();
        let v_max = sampling.iter().map(|s| u32::from(s.1)).max().unwrap();
        let (mx, my) = if sampling.len() == 1 {
            (u32::from(width).div_ceil(8), u32::from(height).div_ceil(8))
        } else {
            (
                u32::from(width).div_ceil(8 * h_max),
                u32::from(height).div_ceil(8 * v_max),
            )
        };
        let mut w = Writer { out, acc: 0, n: 0 };
        let mut mcus = 0u32;
        let mut rst = 0u8;
        for _ in 0..mx * my {
            if restart > 0 && mcus == u32::from(restart) {
                w.pad();
                w.out.extend_from_slice(&[0xFF, 0xD0 + rst]);
                rst = (rst + 1) % 8;
                mcus = 0;
            }
            mcus += 1;
            for &(h, v) in sampling {
                let blocks = if sampling.len() == 1 { 1 } else { h * v };
                for _ in 0..blocks {
                    // DC difference: small mostly, sometimes large.
                    let s = if rng.random_bool(0.1) {
                        rng.random_range(0..=11u32)
                    } else {
                        rng.random_range(0..=4u32)
                    };
                    let (code, len) = dc_codes[s as usize];
                    w.bits(code, len);
                    w.bits(rng.random::<u32>(), s);
                    let mut k = 1u32;
                    while k < 64 {
                        if rng.random_bool(0.15) {
                            let (code, len) = ac_codes[ac_index(0x00)];
                            w.bits(code, len);
                            break;
                        }
                        if k + 16 <= 63 && rng.random_bool(0.05) {
                            let (code, len) = ac_codes[ac_index(0xF0)];
                            w.bits(code, len);
                            k += 16;
                            continue;
                        }
                        let r = rng.random_range(0..=(63 - k).min(15));
                        let s = rng.random_range(1..=10u32);
                        let (code, len) = ac_codes[ac_index((r as u8) << 4 | s as u8)];
                        w.bits(code, len);
                        w.bits(rng.random::<u32>(), s);
                        k += r + 1;
                    }
                }
            }
        }
        w.pad();
        let mut out = w.out;
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    const LAYOUTS: &[&[(u8, u8)]] = &[
        &[(1, 1)],
        &[(1, 1), (1, 1), (1, 1)],
        &[(2, 2), (1, 1), (1, 1)],
        &[(2, 1), (1, 1), (1, 1)],
        &[(1, 2), (1, 1), (1, 1)],
        &[(2, 2), (1, 2), (2, 1)],
        &[(4, 1), (1, 1), (1, 1)],
        &[(4, 2), (1, 1), (1, 1)],
        &[(3, 1), (1, 1), (1, 1)],
        &[(2, 1), (2, 1), (2, 1)],
    ];

    #[test]
    fn byte_identical_to_jpeg_decoder_on_generated_files() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut checked = 0;
        for layout in LAYOUTS {
            for &(width, height) in &[(1, 1), (8, 8), (9, 17), (203, 117), (64, 300), (333, 41)] {
                for restart in [0u16, 1, 3, 7] {
                    let file = synthetic(&mut rng, width, height, layout, restart);
                    let want = reference(&file).expect("jpeg-decoder decodes the generated file");
                    let got = fast(&file).unwrap_or_else(|| {
                        panic!("fast path declined {layout:?} {width}x{height} restart {restart}")
                    });
                    assert_eq!(
                        (got.0, got.1),
                        (want.0, want.1),
                        "{layout:?} {width}x{height}"
                    );
                    assert!(
                        got.2 == want.2,
                        "pixels differ: {layout:?} {width}x{height} restart {restart}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, LAYOUTS.len() * 6 * 4);
    }

    #[test]
    fn damaged_files_are_declined_or_decoded_identically() {
        let mut rng = StdRng::seed_from_u64(11);
        let (mut agreed, mut declined) = (0, 0);
        for round in 0..400 {
            let layout = LAYOUTS[round % LAYOUTS.len()];
            let restart = [0u16, 2][round % 2];
            let mut file = synthetic(&mut rng, 61, 45, layout, restart);
            match round % 4 {
                0 => file.truncate(rng.random_range(2..file.len())),
                _ => {
                    for _ in 0..rng.random_range(1..=3) {
                        let at = rng.random_range(2..file.len());
                        file[at] = rng.random();
                    }
                }
            }
            match fast(&file) {
                Some(got) => {
                    let want = reference(&file);
                    assert_eq!(
                        Some(got),
                        want,
                        "round {round}: fast path accepted a file jpeg-decoder decodes differently"
                    );
                    agreed += 1;
                }
                None => declined += 1,
            }
        }
        // Both outcomes must occur for the test to mean anything.
        assert!(
            agreed > 20 && declined > 20,
            "agreed {agreed}, declined {declined}"
        );
    }

    /// Real files: `LEUKNET_JPEG_DC_FILES=a.jpg:b.jpg cargo test --release --lib -- --ignored`
    /// (camera frames, other encoders); each must decode identically or be declined.
    #[test]
    #[ignore = "needs LEUKNET_JPEG_DC_FILES"]
    fn byte_identical_on_the_files_in_leuknet_jpeg_dc_files() {
        let list = std::env::var("LEUKNET_JPEG_DC_FILES").expect("LEUKNET_JPEG_DC_FILES");
        for path in list.split(':').filter(|p| !p.is_empty()) {
            let file = std::fs::read(path).expect("readable file");
            match fast(&file) {
                Some(got) => {
                    assert!(
                        Some(got) == reference(&file),
                        "{path}: differs from jpeg-decoder"
                    );
                    eprintln!("{path}: identical");
                }
                None => eprintln!("{path}: declined (jpeg-decoder decodes it)"),
            }
        }
    }

    #[test]
    fn ssse3_lane_formula_matches_scalar_mostly_and_stays_in_range() {
        // The two formulas are jpeg-decoder's; they differ by at most 1 (hence both are kept).
        for y in (0..=255u8).step_by(5) {
            for cb in (0..=255u8).step_by(3) {
                for cr in (0..=255u8).step_by(7) {
                    let (a, b) = (ycbcr_scalar(y, cb, cr), ycbcr_ssse3(y, cb, cr));
                    for c in 0..3 {
                        assert!(a[c].abs_diff(b[c]) <= 1, "{y} {cb} {cr}: {a:?} {b:?}");
                    }
                }
            }
        }
    }
}
