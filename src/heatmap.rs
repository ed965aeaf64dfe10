//! Turns a Grad-CAM grid into what people look at: the grid normalised to its maximum, and a
//! small RGBA PNG overlay (bilinear upsampling, a blue-to-red colour map, opacity rising with
//! the value) that covers the whole image the model saw.

use image::{ImageBuffer, Rgba};

/// Colour-map stops from 0 to 1: blue, cyan, green, yellow, red.
const STOPS: [[f32; 3]; 5] = [
    [0.0, 0.0, 1.0],
    [0.0, 1.0, 1.0],
    [0.0, 1.0, 0.0],
    [1.0, 1.0, 0.0],
    [1.0, 0.0, 0.0],
];

/// Most opacity of the overlay, at the grid's maximum.
const MAX_ALPHA: f32 = 0.75;

/// The grid divided by its maximum (all zeros when the maximum is not positive), row by row.
pub fn normalised_rows(grid: &[f32], cols: usize) -> Vec<Vec<f32>> {
    let max = grid.iter().copied().fold(0f32, f32::max);
    grid.chunks(cols.max(1))
        .map(|row| {
            row.iter()
                .map(|&v| {
                    if max > 0.0 {
                        (v.max(0.0) / max).min(1.0)
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

fn colour(v: f32) -> [u8; 3] {
    let x = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let t = x - i as f32;
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let value = STOPS[i][c] + (STOPS[i + 1][c] - STOPS[i][c]) * t;
        *o = (value * 255.0).round() as u8;
    }
    out
}

/// Samples the normalised grid at output pixel centres (bilinear, edges clamped).
fn sample(rows: &[Vec<f32>], y: f32, x: f32) -> f32 {
    let (h, w) = (rows.len(), rows.first().map_or(0, Vec::len));
    if h == 0 || w == 0 {
        return 0.0;
    }
    let fy = (y - 0.5).clamp(0.0, (h - 1) as f32);
    let fx = (x - 0.5).clamp(0.0, (w - 1) as f32);
    let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (ty, tx) = (fy - y0 as f32, fx - x0 as f32);
    let top = rows[y0][x0] * (1.0 - tx) + rows[y0][x1] * tx;
    let bottom = rows[y1][x0] * (1.0 - tx) + rows[y1][x1] * tx;
    top * (1.0 - ty) + bottom * ty
}

/// Renders the grid (`rows x cols`, row-major) as a `size x size` RGBA PNG.
pub fn overlay_png(grid: &[f32], rows: usize, cols: usize, size: u32) -> Vec<u8> {
    let norm = normalised_rows(grid, cols);
    debug_assert_eq!(norm.len(), rows);
    let scale_y = rows as f32 / size as f32;
    let scale_x = cols as f32 / size as f32;
    let img = ImageBuffer::from_fn(size, size, |x, y| {
        let v = sample(
            &norm,
            (y as f32 + 0.5) * scale_y,
            (x as f32 + 0.5) * scale_x,
        );
        let [r, g, b] = colour(v);
        Rgba([r, g, b, (v * MAX_ALPHA * 255.0).round() as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    // Writing a PNG to memory cannot fail for an in-bounds RGBA buffer.
    if img.write_to(&mut out, image::ImageFormat::Png).is_err() {
        return Vec::new();
    }
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_to_the_maximum_and_survives_an_empty_map() {
        assert_eq!(
            normalised_rows(&[0.0, 2.0, 4.0, 1.0], 2),
            vec![vec![0.0, 0.5], vec![1.0, 0.25]]
        );
        assert_eq!(normalised_rows(&[0.0; 4], 2), vec![vec![0.0; 2]; 2]);
    }

    #[test]
    fn overlay_is_a_png_whose_hot_corner_is_red_and_opaque() {
        // 2x2 grid, hottest at the bottom right.
        let png = overlay_png(&[0.0, 0.0, 0.0, 1.0], 2, 2, 16);
        let img = image::load_from_memory(&png).unwrap().to_rgba8();
        assert_eq!(img.dimensions(), (16, 16));
        let hot = img.get_pixel(15, 15);
        let cold = img.get_pixel(0, 0);
        assert_eq!((hot[0], hot[2]), (255, 0), "{hot:?}");
        assert_eq!(hot[3], (MAX_ALPHA * 255.0).round() as u8);
        assert_eq!(cold[3], 0, "{cold:?}");
    }
}
