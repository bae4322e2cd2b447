/* A training view straight from JPEG bytes: decode only the part a crop keeps, at the smallest DCT scale that
 * still covers the output, then resize the little that is left.
 *
 * A random resized crop keeps 20-100% of an image and shrinks it to the training side, so decoding the whole
 * file wastes work twice over. libjpeg-turbo can do less: jpeg_skip_scanlines runs only the entropy decoder
 * over the rows above the crop, jpeg_crop_scanline limits the inverse DCT, upsampling and colour conversion
 * to the columns the crop covers, decoding stops after its last row, and scale_num/8 runs a smaller inverse
 * DCT (a low-pass filter in the DCT domain) when the crop is at least twice the output. The scale chosen
 * leaves the decoded crop less than twice the output side (unless it was already smaller), so the resize
 * after it is bilinear: OpenCV's area filter, which FFCV's decoder uses, costs several times as much there.
 *
 * Loaded with ctypes and called from the numba-compiled FFCV pipeline (no Python per image), as FFCV's own
 * libffcv is.
 */
#include <csetjmp>
#include <cstdint>
#include <cstdio>

#include <jpeglib.h>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

namespace {

struct Failure {
    jpeg_error_mgr manager;
    std::jmp_buf jump;
};

void fail(j_common_ptr cinfo) {
    std::longjmp(reinterpret_cast<Failure *>(cinfo->err)->jump, 1);
}

/* libjpeg prints a warning for each recoverable flaw (a truncated file, extraneous bytes). The pixels it
 * recovers are kept, as FFCV's decoder keeps them; the message would interleave with the training log. */
void stay_quiet(j_common_ptr) {}

/* The smallest of 1/8, 1/4, 1/2 and 1 (the scales with SIMD inverse DCTs) by which both sides of the box still
 * cover the output. */
int scale_for(int64_t width, int64_t height, int64_t out_width, int64_t out_height) {
    int num = 1;
    while (num < 8 && (width * num < out_width * 8 || height * num < out_height * 8)) num *= 2;
    return num;
}

int64_t clamp(int64_t value, int64_t low, int64_t high) {
    return value < low ? low : value > high ? high : value;
}

/* Decodes the rows and columns that cover the box into `scratch`; returns the box inside the block decoded. */
int decode_box(const uint8_t *data, uint64_t size, int64_t left, int64_t top, int64_t width, int64_t height,
               int64_t out_width, int64_t out_height, uint8_t *scratch, uint64_t capacity, cv::Mat &block,
               cv::Rect &box) {
    jpeg_decompress_struct cinfo;
    Failure failure;
    cinfo.err = jpeg_std_error(&failure.manager);
    failure.manager.error_exit = fail;
    failure.manager.output_message = stay_quiet;
    if (setjmp(failure.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, const_cast<uint8_t *>(data), static_cast<unsigned long>(size));
    jpeg_read_header(&cinfo, TRUE);
    int num = scale_for(width, height, out_width, out_height);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST;  // as FFCV's decoder (TJFLAG_FASTDCT)
    cinfo.scale_num = num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);

    // The box in the scaled image, then the whole rows and columns that cover it. Chroma is upsampled from
    // its neighbours, which a column crop replaces with copies of its edge: a margin keeps that off the box.
    double scale = num / 8.0;
    double x0 = left * scale, x1 = (left + width) * scale, y0 = top * scale, y1 = (top + height) * scale;
    const int64_t margin = 4;
    JDIMENSION first_column = clamp(static_cast<int64_t>(x0) - margin, 0, cinfo.output_width - 1);
    JDIMENSION columns = clamp(static_cast<int64_t>(x1 + 0.999999) + margin, first_column + 1, cinfo.output_width)
                         - first_column;
    int64_t first_row = clamp(static_cast<int64_t>(y0), 0, cinfo.output_height - 1);
    int64_t end_row = clamp(static_cast<int64_t>(y1 + 0.999999), first_row + 1, cinfo.output_height);
    jpeg_crop_scanline(&cinfo, &first_column, &columns);  // widened to whole iMCUs: first_column moves left
    int64_t stride = static_cast<int64_t>(cinfo.output_width) * 3;
    if (static_cast<uint64_t>(stride * (end_row - first_row)) > capacity) {
        jpeg_destroy_decompress(&cinfo);
        return -2;
    }
    if (first_row > 0) jpeg_skip_scanlines(&cinfo, static_cast<JDIMENSION>(first_row));
    while (static_cast<int64_t>(cinfo.output_scanline) < end_row) {
        JSAMPROW row = scratch + (cinfo.output_scanline - first_row) * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    int rows = static_cast<int>(end_row - first_row), cols = static_cast<int>(cinfo.output_width);
    block = cv::Mat(rows, cols, CV_8UC3, scratch);
    int r0 = clamp(static_cast<int64_t>(y0 - first_row + 0.5), 0, rows - 1);
    int r1 = clamp(static_cast<int64_t>(y1 - first_row + 0.5), r0 + 1, rows);
    int c0 = clamp(static_cast<int64_t>(x0 - first_column + 0.5), 0, cols - 1);
    int c1 = clamp(static_cast<int64_t>(x1 - first_column + 0.5), c0 + 1, cols);
    box = cv::Rect(c0, r0, c1 - c0, r1 - r0);
    jpeg_abort_decompress(&cinfo);  // finishing would decode the rows below the box
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

}  // namespace

extern "C" {

/* The box (left, top, width, height) of the JPEG in `data`, resized to out_height x out_width RGB into `out`
 * (flipped left to right if `flip`), through `scratch`, of `capacity` bytes. Returns 0, or -1 for data
 * libjpeg cannot decode, -2 when the decoded rows would not fit in `scratch`. */
int64_t supmae_jpeg_view(const uint8_t *data, uint64_t size, int64_t left, int64_t top, int64_t width,
                         int64_t height, uint8_t *out, int64_t out_height, int64_t out_width, int64_t flip,
                         uint8_t *scratch, uint64_t capacity) {
    cv::Mat block;
    cv::Rect box;
    int status = decode_box(data, size, left, top, width, height, out_width, out_height, scratch, capacity,
                            block, box);
    if (status != 0) return status;
    cv::Mat view(static_cast<int>(out_height), static_cast<int>(out_width), CV_8UC3, out);
    cv::resize(block(box), view, view.size(), 0, 0, cv::INTER_LINEAR);
    if (flip) cv::flip(view, view, 1);
    return 0;
}

/* The value at `address`. numba freezes an array that compiled code captures into a constant, so an epoch
 * that changes while the code stays compiled is read through its cell's address. */
int64_t supmae_load_int64(int64_t address) {
    return *reinterpret_cast<const int64_t *>(address);
}

}
