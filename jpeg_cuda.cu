// JPEG decoding on the GPU with nvJPEG, for jpeg.py (built by it like scan_cuda.cu: a plain shared library
// with the extern "C" interface at the end, called through ctypes).
//
// One decoder (`Decoder`) per GPU and per thread that decodes at once (jpeg.py's slots), created once and
// reused. A batch is split by the file headers:
//   - baseline files that nvjpegDecodeBatchedSupported accepts go to the JPEG engines (NVJPEG_BACKEND_HARDWARE,
//     one nvjpegDecodeBatched call; A100/H100/H200 have the engines);
//   - the others (progressive, sizes or subsamplings the engines refuse, every file on a GPU without engines)
//     go one at a time through the decoupled host/transfer/device phases of NVJPEG_BACKEND_DEFAULT.
// If the engines' batch call fails (one bad file fails the whole call), its files are retried one at a time on
// the second path, so every file gets its own status.
//
// Output: planar RGB (NVJPEG_OUTPUT_RGB), 3 planes of H x W bytes in a buffer Python allocated (a contiguous
// (3, H, W) uint8 tensor), written on the stream Python passes (torch's current stream); the call waits for that
// stream before the engines write (they do not keep its order) and returns after it has finished, so the
// outputs, the input bytes and nvJPEG's own buffers are free to reuse. Greyscale files come out as three equal
// planes.
//
// Before nvJPEG sees a file, our own header checks (`inspect`) refuse what it would decode differently from
// libjpeg (Pillow) or could not decode at all: no SOI marker (a PNG named .JPEG, random bytes), unreadable
// markers, no EOI marker near the end (a truncated file: Pillow raises for it), not 1 or 3 components (CMYK,
// YCCK), 3 components that libjpeg reads as RGB rather than YCbCr (Adobe transform 0, or 'R','G','B'
// component ids without JFIF), not 8 bits, lossless or arithmetic-coded, an unknown subsampling. A refused file
// gets a status (MV_JPEG_* below) and Python decodes it with Pillow.
//
// Codes (return values and per-file statuses): 0 success; 1..10 nvjpegStatus_t; 101..107 our refusals (below);
// -1..-3 bad call; 1000 + cudaError_t a CUDA error. mv_jpeg_error_string names each.
#include <cuda_runtime.h>
#include <nvjpeg.h>

#include <cstddef>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

namespace {

enum : int {
  MV_JPEG_NOT_JPEG = 101,    // does not start with SOI (FF D8)
  MV_JPEG_BAD_HEADER = 102,  // markers before the first scan unreadable, or no frame header
  MV_JPEG_NO_EOI = 103,      // no EOI (FF D9) in the last 64 bytes: truncated
  MV_JPEG_COLOR = 104,       // not greyscale or YCbCr: CMYK, YCCK, or RGB stored as is
  MV_JPEG_FORMAT = 105,      // not 8-bit, lossless or arithmetic coding, unknown subsampling, odd plane sizes
  MV_JPEG_SIZE = 106,        // the output buffer's width and height are not the image's
  MV_JPEG_SKIPPED = 107,     // no output buffer given
  MV_JPEG_BAD_ARGS = -1,
  MV_JPEG_WRONG_DEVICE = -2,  // called with another current device than the decoder's
  MV_JPEG_NO_MEMORY = -3,
  MV_JPEG_CUDA = 1000,  // + cudaError_t
  kInfoFields = 6,      // mv_jpeg_info's fields per file: width, height, components, subsampling, hardware, code
  kEoiWindow = 64,      // bytes at the end searched for EOI (a few writers pad after it)
};

struct Decoder {
  std::mutex mutex;
  int device = -1;
  bool hardware = false;                      // handle made with NVJPEG_BACKEND_HARDWARE
  nvjpegHandle_t handle = nullptr;
  nvjpegJpegState_t hw_state = nullptr;       // nvjpegDecodeBatched's state (hardware only)
  nvjpegJpegDecoder_t decoder = nullptr;      // the decoupled decoder, NVJPEG_BACKEND_DEFAULT
  nvjpegJpegState_t sw_state = nullptr;       // its state
  nvjpegBufferPinned_t pinned[2] = {nullptr, nullptr};  // alternated between files, as torchvision does
  nvjpegBufferDevice_t device_buffer = nullptr;
  nvjpegJpegStream_t streams[2] = {nullptr, nullptr};   // parsed files of the decoupled path
  nvjpegJpegStream_t header = nullptr;        // header-only parses for `inspect`
  nvjpegDecodeParams_t params = nullptr;      // output format RGB
};

// What `inspect` learns from a file's header.
struct Info {
  int width = 0, height = 0, components = 0, subsampling = NVJPEG_CSS_UNKNOWN;
  int hardware = 0;  // the JPEG engines take it (nvjpegDecodeBatchedSupported)
  int code = 0;      // 0: decodable by us, else why not
};

bool is_sof(unsigned char m) {  // frame headers: C0-CF less DHT (C4), JPG (C8) and DAC (CC)
  return m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
}

// Walks the markers from SOI to the first SOS (no entropy-coded data is read) and checks the end for EOI.
// Fills the frame type, component count and ids, and the JFIF / Adobe markers that decide libjpeg's colour space.
struct Markers {
  unsigned char sof = 0;
  int precision = 0, height = 0, width = 0, components = 0;
  int ids[3] = {-1, -1, -1};
  bool jfif = false;
  int adobe_transform = -1;  // -1: no Adobe APP14 marker
};

int walk_markers(const unsigned char* p, size_t n, Markers* m) {
  if (p == nullptr || n < 4 || p[0] != 0xFF || p[1] != 0xD8) return MV_JPEG_NOT_JPEG;
  size_t i = 2, scan = 0;
  while (scan == 0) {
    if (i >= n || p[i] != 0xFF) return MV_JPEG_BAD_HEADER;
    while (i < n && p[i] == 0xFF) ++i;  // fill bytes
    if (i >= n) return MV_JPEG_BAD_HEADER;
    const unsigned char marker = p[i++];
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) continue;  // markers without a length
    if (marker == 0xD9 || marker == 0x00) return MV_JPEG_BAD_HEADER;     // EOI before a scan; a stuffed zero
    if (i + 2 > n) return MV_JPEG_BAD_HEADER;
    const size_t len = (static_cast<size_t>(p[i]) << 8) | p[i + 1];  // counts its own 2 bytes
    if (len < 2 || len > n - i) return MV_JPEG_BAD_HEADER;
    const unsigned char* s = p + i + 2;
    const size_t sn = len - 2;
    if (marker == 0xE0 && sn >= 5 && std::memcmp(s, "JFIF\0", 5) == 0) m->jfif = true;
    if (marker == 0xEE && sn >= 12 && std::memcmp(s, "Adobe", 5) == 0) m->adobe_transform = s[11];
    if (is_sof(marker)) {
      if (m->sof != 0 || sn < 6) return MV_JPEG_BAD_HEADER;  // two frames, or a short one
      m->sof = marker;
      m->precision = s[0];
      m->height = (s[1] << 8) | s[2];
      m->width = (s[3] << 8) | s[4];
      m->components = s[5];
      for (int k = 0; k < 3 && 6 + 3 * static_cast<size_t>(k) < sn; ++k) m->ids[k] = s[6 + 3 * k];
    }
    if (marker == 0xDA) scan = i + len;
    i += len;
  }
  if (m->sof == 0) return MV_JPEG_BAD_HEADER;
  // EOI after the first scan's header, within the last kEoiWindow bytes. In entropy-coded data FF is followed
  // by 00 or a restart marker, so a file cut inside a scan has no FF D9 at its end.
  const size_t window = kEoiWindow, lo = n - scan > window ? n - window : scan;
  for (size_t j = n - 1; j > lo; --j)
    if (p[j - 1] == 0xFF && p[j] == 0xD9) return 0;
  return MV_JPEG_NO_EOI;
}

// Reads one file's header (ours, then nvJPEG's) without decoding; info->code says whether we decode it.
void inspect(Decoder* d, const unsigned char* data, size_t len, Info* info) {
  *info = Info();
  Markers m;
  info->code = walk_markers(data, len, &m);
  if (info->code != 0) return;
  info->width = m.width;
  info->height = m.height;
  info->components = m.components;
  const bool libjpeg_rgb = m.components == 3 && !m.jfif &&
                           (m.adobe_transform == 0 ||
                            (m.adobe_transform < 0 && m.ids[0] == 'R' && m.ids[1] == 'G' && m.ids[2] == 'B'));
  if ((m.components != 1 && m.components != 3) || libjpeg_rgb) {
    info->code = MV_JPEG_COLOR;
    return;
  }
  if (m.precision != 8 || (m.sof != 0xC0 && m.sof != 0xC1 && m.sof != 0xC2)) {  // or lossless, arithmetic...
    info->code = MV_JPEG_FORMAT;
    return;
  }
  nvjpegStatus_t s = nvjpegJpegStreamParseHeader(d->handle, data, len, d->header);
  if (s != NVJPEG_STATUS_SUCCESS) {
    info->code = s;
    return;
  }
  unsigned int w = 0, h = 0, w0 = 0, h0 = 0, components = 0, precision = 0;
  nvjpegJpegEncoding_t encoding = NVJPEG_ENCODING_UNKNOWN;
  nvjpegChromaSubsampling_t css = NVJPEG_CSS_UNKNOWN;
  if ((s = nvjpegJpegStreamGetFrameDimensions(d->header, &w, &h)) != NVJPEG_STATUS_SUCCESS ||
      (s = nvjpegJpegStreamGetComponentsNum(d->header, &components)) != NVJPEG_STATUS_SUCCESS ||
      (s = nvjpegJpegStreamGetComponentDimensions(d->header, 0, &w0, &h0)) != NVJPEG_STATUS_SUCCESS ||
      (s = nvjpegJpegStreamGetJpegEncoding(d->header, &encoding)) != NVJPEG_STATUS_SUCCESS ||
      (s = nvjpegJpegStreamGetSamplePrecision(d->header, &precision)) != NVJPEG_STATUS_SUCCESS ||
      (s = nvjpegJpegStreamGetChromaSubsampling(d->header, &css)) != NVJPEG_STATUS_SUCCESS) {
    info->code = s;
    return;
  }
  info->width = static_cast<int>(w);
  info->height = static_cast<int>(h);
  info->components = static_cast<int>(components);
  info->subsampling = css;
  if (static_cast<int>(components) != m.components || static_cast<int>(w) != m.width ||
      static_cast<int>(h) != m.height) {
    info->code = MV_JPEG_BAD_HEADER;  // nvJPEG read the header differently from us
  } else if (precision != 8 ||
             (encoding != NVJPEG_ENCODING_BASELINE_DCT && encoding != NVJPEG_ENCODING_EXTENDED_SEQUENTIAL_DCT_HUFFMAN &&
              encoding != NVJPEG_ENCODING_PROGRESSIVE_DCT_HUFFMAN) ||
             css == NVJPEG_CSS_UNKNOWN || w == 0 || h == 0 || w0 != w || h0 != h || w > 65535 || h > 65535) {
    info->code = MV_JPEG_FORMAT;
  } else if (d->hardware) {
    int unsupported = -1;  // nvJPEG sets 0 when the engines take the file
    info->hardware = nvjpegDecodeBatchedSupported(d->handle, d->header, &unsupported) == NVJPEG_STATUS_SUCCESS &&
                     unsupported == 0;
  }
}

nvjpegImage_t planes(unsigned char* out, int width, int height) {
  nvjpegImage_t image;
  for (int c = 0; c < NVJPEG_MAX_COMPONENT; ++c) {
    image.channel[c] = c < 3 ? out + static_cast<size_t>(c) * width * height : nullptr;
    image.pitch[c] = c < 3 ? static_cast<size_t>(width) : 0;
  }
  return image;
}

int cuda_code(cudaError_t e) { return e == cudaSuccess ? 0 : MV_JPEG_CUDA + static_cast<int>(e); }

void destroy(Decoder* d) {
  if (d->params) nvjpegDecodeParamsDestroy(d->params);
  if (d->header) nvjpegJpegStreamDestroy(d->header);
  for (auto& s : d->streams)
    if (s) nvjpegJpegStreamDestroy(s);
  if (d->sw_state) nvjpegJpegStateDestroy(d->sw_state);
  if (d->hw_state) nvjpegJpegStateDestroy(d->hw_state);
  if (d->device_buffer) nvjpegBufferDeviceDestroy(d->device_buffer);
  for (auto& b : d->pinned)
    if (b) nvjpegBufferPinnedDestroy(b);
  if (d->decoder) nvjpegDecoderDestroy(d->decoder);
  if (d->handle) nvjpegDestroy(d->handle);
  delete d;
}

// A fresh decoupled state after a failed file (what nvJPEG leaves in the old one is not documented).
int reset_sw_state(Decoder* d, cudaStream_t stream) {
  const int c = cuda_code(cudaStreamSynchronize(stream));
  if (c != 0) return c;
  if (d->sw_state) nvjpegJpegStateDestroy(d->sw_state);
  d->sw_state = nullptr;
  nvjpegStatus_t s = nvjpegDecoderStateCreate(d->handle, d->decoder, &d->sw_state);
  if (s == NVJPEG_STATUS_SUCCESS) s = nvjpegStateAttachDeviceBuffer(d->sw_state, d->device_buffer);
  return s;
}

// One file through the decoupled phases (NVJPEG_BACKEND_DEFAULT), torchvision's sequence: parse, host phase
// into pinned buffer `b`, wait for the stream, transfer, device phase. Returns its nvjpegStatus_t.
int decode_one(Decoder* d, const unsigned char* data, size_t len, nvjpegImage_t* out, int b, cudaStream_t stream) {
  nvjpegStatus_t s = nvjpegJpegStreamParse(d->handle, data, len, 0, 0, d->streams[b]);
  if (s == NVJPEG_STATUS_SUCCESS) s = nvjpegStateAttachPinnedBuffer(d->sw_state, d->pinned[b]);
  if (s == NVJPEG_STATUS_SUCCESS)
    s = nvjpegDecodeJpegHost(d->handle, d->decoder, d->sw_state, d->params, d->streams[b]);
  if (s == NVJPEG_STATUS_SUCCESS) {
    const int c = cuda_code(cudaStreamSynchronize(stream));
    if (c != 0) return c;
    s = nvjpegDecodeJpegTransferToDevice(d->handle, d->decoder, d->sw_state, d->streams[b], stream);
  }
  if (s == NVJPEG_STATUS_SUCCESS) s = nvjpegDecodeJpegDevice(d->handle, d->decoder, d->sw_state, out, stream);
  return s;
}

int decode_batch(Decoder* d, int n, const unsigned char* const* data, const size_t* len, unsigned char* const* out,
                 const int* width, const int* height, cudaStream_t stream, int* status) {
  std::vector<int> hw, sw, grey;  // file indices
  for (int k = 0; k < n; ++k) {
    Info info;
    if (out[k] == nullptr) {
      status[k] = MV_JPEG_SKIPPED;
      continue;
    }
    inspect(d, data[k], len[k], &info);
    if (info.code == 0 && (info.width != width[k] || info.height != height[k])) info.code = MV_JPEG_SIZE;
    status[k] = info.code;
    if (info.code != 0) continue;
    (info.hardware ? hw : sw).push_back(k);
    if (info.components == 1) grey.push_back(k);
  }

  if (!hw.empty()) {
    std::vector<const unsigned char*> hw_data;
    std::vector<size_t> hw_len;
    std::vector<nvjpegImage_t> hw_out;
    for (int k : hw) {
      hw_data.push_back(data[k]);
      hw_len.push_back(len[k]);
      hw_out.push_back(planes(out[k], width[k], height[k]));
    }
    // The engines write the outputs when nvjpegDecodeBatched is called, not in the stream's order (reported for
    // nvJPEG 12.3-13.2 on H100s; test_jpeg.py checks the wait): the output buffers may be memory that work still queued
    // on `stream` reads (the caching allocator hands a block on as soon as it is freed on its stream), so that
    // work must finish first.
    const int drained = cuda_code(cudaStreamSynchronize(stream));
    if (drained != 0) return drained;
    nvjpegStatus_t s = nvjpegDecodeBatchedInitialize(d->handle, d->hw_state, static_cast<int>(hw.size()), 1,
                                                     NVJPEG_OUTPUT_RGB);
    if (s == NVJPEG_STATUS_SUCCESS)
      s = nvjpegDecodeBatched(d->handle, d->hw_state, hw_data.data(), hw_len.data(), hw_out.data(), stream);
    if (s != NVJPEG_STATUS_SUCCESS) {  // retry each file alone, so that one bad file fails alone
      const int c = cuda_code(cudaStreamSynchronize(stream));
      if (c != 0) return c;
      sw.insert(sw.end(), hw.begin(), hw.end());
    }
  }

  int b = 0;
  for (int k : sw) {
    nvjpegImage_t image = planes(out[k], width[k], height[k]);
    const int s = decode_one(d, data[k], len[k], &image, b, stream);
    if (s >= MV_JPEG_CUDA) return s;
    status[k] = s;
    if (s != 0) {
      const int r = reset_sw_state(d, stream);
      if (r != 0) return r;
    }
    b = 1 - b;
  }

  // Greyscale: copy plane 0 to planes 1 and 2, so that they are equal whatever nvJPEG writes there.
  for (int k : grey) {
    if (status[k] != 0) continue;
    const size_t plane = static_cast<size_t>(width[k]) * height[k];
    for (int c = 1; c < 3; ++c) {
      const int e = cuda_code(cudaMemcpyAsync(out[k] + c * plane, out[k], plane, cudaMemcpyDeviceToDevice, stream));
      if (e != 0) return e;
    }
  }
  return cuda_code(cudaStreamSynchronize(stream));
}

}  // namespace

extern "C" {

int mv_jpeg_info_fields() { return kInfoFields; }

const char* mv_jpeg_error_string(int code) {
  switch (code) {
    case 0: return "success";
    case NVJPEG_STATUS_NOT_INITIALIZED: return "nvJPEG: not initialized";
    case NVJPEG_STATUS_INVALID_PARAMETER: return "nvJPEG: invalid parameter";
    case NVJPEG_STATUS_BAD_JPEG: return "nvJPEG: bad JPEG";
    case NVJPEG_STATUS_JPEG_NOT_SUPPORTED: return "nvJPEG: JPEG not supported";
    case NVJPEG_STATUS_ALLOCATOR_FAILURE: return "nvJPEG: allocator failure (out of memory?)";
    case NVJPEG_STATUS_EXECUTION_FAILED: return "nvJPEG: execution failed";
    case NVJPEG_STATUS_ARCH_MISMATCH: return "nvJPEG: architecture mismatch";
    case NVJPEG_STATUS_INTERNAL_ERROR: return "nvJPEG: internal error";
    case NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED: return "nvJPEG: implementation not supported";
    case NVJPEG_STATUS_INCOMPLETE_BITSTREAM: return "nvJPEG: incomplete bitstream";
    case MV_JPEG_NOT_JPEG: return "not a JPEG (no SOI marker)";
    case MV_JPEG_BAD_HEADER: return "unreadable JPEG markers before the first scan";
    case MV_JPEG_NO_EOI: return "no EOI marker at the end (truncated file)";
    case MV_JPEG_COLOR: return "colour space nvJPEG would decode differently from libjpeg (CMYK, YCCK or RGB)";
    case MV_JPEG_FORMAT: return "unsupported JPEG format (not 8-bit, lossless, arithmetic, or odd subsampling)";
    case MV_JPEG_SIZE: return "output buffer size differs from the image's";
    case MV_JPEG_SKIPPED: return "skipped (no output buffer)";
    case MV_JPEG_BAD_ARGS: return "invalid arguments";
    case MV_JPEG_WRONG_DEVICE: return "the current CUDA device is not the decoder's";
    case MV_JPEG_NO_MEMORY: return "out of host memory";
    default:
      return code >= MV_JPEG_CUDA ? cudaGetErrorString(static_cast<cudaError_t>(code - MV_JPEG_CUDA))
                                  : "unknown error code";
  }
}

// A decoder for the current CUDA device. allow_hardware 0: never use the JPEG engines (every file takes the
// decoupled path). *out is null unless it returns 0.
int mv_jpeg_create(int allow_hardware, void** out) {
  if (out == nullptr) return MV_JPEG_BAD_ARGS;
  *out = nullptr;
  Decoder* d = new (std::nothrow) Decoder();
  if (d == nullptr) return MV_JPEG_NO_MEMORY;
  int code = cuda_code(cudaGetDevice(&d->device));
  if (code == 0 && allow_hardware) {  // no engines (ARCH_MISMATCH) or no usable state: go on without them
    nvjpegHandle_t handle = nullptr;
    nvjpegJpegState_t hw_state = nullptr;
    if (nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, nullptr, nullptr, NVJPEG_FLAGS_DEFAULT, &handle) ==
        NVJPEG_STATUS_SUCCESS) {
      if (nvjpegJpegStateCreate(handle, &hw_state) == NVJPEG_STATUS_SUCCESS) {
        d->handle = handle;
        d->hw_state = hw_state;
        d->hardware = true;
      } else {
        nvjpegDestroy(handle);
      }
    }
  }
  nvjpegStatus_t s = NVJPEG_STATUS_SUCCESS;
  if (code == 0 && d->handle == nullptr)
    s = nvjpegCreateEx(NVJPEG_BACKEND_DEFAULT, nullptr, nullptr, NVJPEG_FLAGS_DEFAULT, &d->handle);
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegDecoderCreate(d->handle, NVJPEG_BACKEND_DEFAULT, &d->decoder);
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegDecoderStateCreate(d->handle, d->decoder, &d->sw_state);
  for (int b = 0; b < 2; ++b) {
    if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegBufferPinnedCreate(d->handle, nullptr, &d->pinned[b]);
    if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegJpegStreamCreate(d->handle, &d->streams[b]);
  }
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegJpegStreamCreate(d->handle, &d->header);
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegBufferDeviceCreate(d->handle, nullptr, &d->device_buffer);
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegStateAttachDeviceBuffer(d->sw_state, d->device_buffer);
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegDecodeParamsCreate(d->handle, &d->params);
  if (code == 0 && s == NVJPEG_STATUS_SUCCESS) s = nvjpegDecodeParamsSetOutputFormat(d->params, NVJPEG_OUTPUT_RGB);
  if (code == 0) code = s;
  if (code != 0) {
    destroy(d);
    return code;
  }
  *out = d;
  return 0;
}

int mv_jpeg_destroy(void* state) {
  if (state == nullptr) return MV_JPEG_BAD_ARGS;
  destroy(static_cast<Decoder*>(state));
  return 0;
}

// 1 if the decoder uses the JPEG engines, 0 if not, MV_JPEG_BAD_ARGS without a decoder.
int mv_jpeg_uses_hardware(void* state) {
  return state == nullptr ? MV_JPEG_BAD_ARGS : static_cast<Decoder*>(state)->hardware ? 1 : 0;
}

// Header facts of n files, nothing decoded: info[k * 6 + (0..5)] = width, height, components (1 or 3; 4 for
// CMYK), nvjpegChromaSubsampling_t, 1 if the JPEG engines take it, and the file's code (0: mv_jpeg_decode will
// decode it; else why not). The sizes are 0 where the header could not be read.
int mv_jpeg_info(void* state, int n, const unsigned char* const* data, const size_t* len, int* info) {
  Decoder* d = static_cast<Decoder*>(state);
  if (d == nullptr || n < 0 || (n > 0 && (data == nullptr || len == nullptr || info == nullptr)))
    return MV_JPEG_BAD_ARGS;
  try {
    std::lock_guard<std::mutex> lock(d->mutex);
    for (int k = 0; k < n; ++k) {
      Info one;
      inspect(d, data[k], len[k], &one);
      const int fields[kInfoFields] = {one.width, one.height, one.components, one.subsampling, one.hardware,
                                       one.code};
      std::memcpy(info + static_cast<size_t>(k) * kInfoFields, fields, sizeof fields);
    }
    return 0;
  } catch (const std::bad_alloc&) {
    return MV_JPEG_NO_MEMORY;
  } catch (...) {
    return MV_JPEG_BAD_ARGS;
  }
}

// Decodes n files into out[k]: device memory for 3 planes of height[k] x width[k] bytes (R, G, B), or null to
// skip the file. status[k] = 0 where out[k] holds the image, else the file's code. Runs on `stream` (a
// cudaStream_t; null: the legacy default stream) and returns after it has finished. Returns 0 unless the call
// itself failed (bad arguments, another current device, a CUDA error); the statuses are then not all set.
int mv_jpeg_decode(void* state, int n, const unsigned char* const* data, const size_t* len, unsigned char* const* out,
                   const int* width, const int* height, void* stream, int* status) {
  Decoder* d = static_cast<Decoder*>(state);
  if (d == nullptr || n < 0 ||
      (n > 0 && (data == nullptr || len == nullptr || out == nullptr || width == nullptr || height == nullptr ||
                 status == nullptr)))
    return MV_JPEG_BAD_ARGS;
  for (int k = 0; k < n; ++k) status[k] = MV_JPEG_SKIPPED;
  try {
    std::lock_guard<std::mutex> lock(d->mutex);
    int device = -1;
    const int c = cuda_code(cudaGetDevice(&device));
    if (c != 0) return c;
    if (device != d->device) return MV_JPEG_WRONG_DEVICE;
    const int code = decode_batch(d, n, data, len, out, width, height, static_cast<cudaStream_t>(stream), status);
    if (code == 0) (void)cudaGetLastError();  // a non-sticky error nvJPEG left behind is not torch's next kernel's
    return code;
  } catch (const std::bad_alloc&) {
    return MV_JPEG_NO_MEMORY;
  } catch (...) {
    return MV_JPEG_BAD_ARGS;
  }
}

}  // extern "C"
