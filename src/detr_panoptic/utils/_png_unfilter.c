/* PNG scanline unfiltering (PNG spec, section 9) into packed 32-bit pixels.
 *
 * The one compiled part of detr-panoptic, and optional: when it is not built, PNGs decode through
 * libvips or Pillow (detr_panoptic/utils/png.py), with the same pixels. Inflating is
 * done in Python by zlib-ng; this file only undoes the per-row filters of an 8-bit, non-interlaced
 * image and packs each pixel as R + 256 G + 256^2 B + 256^3 A (A = 255 when the image has no alpha;
 * grey v is the colour (v, v, v)), or, for 16-bit greyscale images (Cityscapes' instance ids), gives
 * the samples as uint16.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint8_t paeth(int a, int b, int c)
{
    int pa = abs(b - c);          /* |p - a| with p = a + b - c */
    int pb = abs(a - c);          /* |p - b| */
    int pc = abs(a + b - 2 * c);  /* |p - c| */
    if (pa <= pb && pa <= pc)
        return (uint8_t)a;
    return (uint8_t)(pb <= pc ? b : c);
}

/* Undo one row's filter: `cur` gets the pixels of the filtered bytes `in`, given the row above `prev`
 * (all zero for the first row). Returns 0, or -1 for an unknown filter type. */
static int unfilter_row(int filter, const uint8_t *in, const uint8_t *prev, uint8_t *cur, Py_ssize_t stride,
                        int bpp)
{
    Py_ssize_t i;
    switch (filter) {
    case 0: /* None */
        memcpy(cur, in, (size_t)stride);
        return 0;
    case 1: /* Sub */
        for (i = 0; i < bpp; i++)
            cur[i] = in[i];
        for (; i < stride; i++)
            cur[i] = (uint8_t)(in[i] + cur[i - bpp]);
        return 0;
    case 2: /* Up */
        for (i = 0; i < stride; i++)
            cur[i] = (uint8_t)(in[i] + prev[i]);
        return 0;
    case 3: /* Average */
        for (i = 0; i < bpp; i++)
            cur[i] = (uint8_t)(in[i] + (prev[i] >> 1));
        for (; i < stride; i++)
            cur[i] = (uint8_t)(in[i] + ((cur[i - bpp] + prev[i]) >> 1));
        return 0;
    case 4: /* Paeth; left of the first pixel, a = c = 0 and the predictor is b */
        for (i = 0; i < bpp; i++)
            cur[i] = (uint8_t)(in[i] + prev[i]);
        for (; i < stride; i++) {
            int a = cur[i - bpp], b = prev[i], c = prev[i - bpp];
            /* Inside a region of one colour b == c, and the predictor is a: no comparisons. */
            cur[i] = (uint8_t)(in[i] + (b == c ? a : paeth(a, b, c)));
        }
        return 0;
    default:
        return -1;
    }
}

static void pack_row(const uint8_t *row, uint32_t *out, Py_ssize_t width, int channels)
{
    Py_ssize_t x;
    switch (channels) {
    case 1: /* grey */
        for (x = 0; x < width; x++)
            out[x] = (uint32_t)row[x] * 0x010101u | 0xFF000000u;
        break;
    case 2: /* grey + alpha */
        for (x = 0; x < width; x++)
            out[x] = (uint32_t)row[2 * x] * 0x010101u | (uint32_t)row[2 * x + 1] << 24;
        break;
    case 3: /* RGB */
        for (x = 0; x < width; x++)
            out[x] = (uint32_t)row[3 * x] | (uint32_t)row[3 * x + 1] << 8 | (uint32_t)row[3 * x + 2] << 16
                     | 0xFF000000u;
        break;
    default: /* RGBA */
        for (x = 0; x < width; x++)
            out[x] = (uint32_t)row[4 * x] | (uint32_t)row[4 * x + 1] << 8 | (uint32_t)row[4 * x + 2] << 16
                     | (uint32_t)row[4 * x + 3] << 24;
        break;
    }
}

/* Pixel layouts: 1-4 are 8-bit images of that many channels, packed into uint32; GREY16 is a
 * 16-bit greyscale image, its samples (big-endian in the file) given as uint16. */
#define GREY16 16

/* Unfilter every row of `in` into `out` (uint32 or uint16 pixels, see above). Returns -1, or the
 * first row whose filter type is unknown (its type in *bad_filter). Touches no Python object. */
static Py_ssize_t unfilter_image(const uint8_t *in, Py_ssize_t width, Py_ssize_t height, int layout,
                                 uint8_t *rows, void *out, int *bad_filter)
{
    int bpp = layout == GREY16 ? 2 : layout; /* bytes per pixel, the distance the filters look left */
    Py_ssize_t stride = width * bpp;
    uint8_t *prev = rows, *cur = rows + stride;
    for (Py_ssize_t y = 0; y < height; y++, in += stride + 1) {
        if (unfilter_row(in[0], in + 1, prev, cur, stride, bpp) != 0) {
            *bad_filter = in[0];
            return y;
        }
        if (layout == GREY16) {
            uint16_t *samples = (uint16_t *)out + y * width;
            for (Py_ssize_t x = 0; x < width; x++)
                samples[x] = (uint16_t)(cur[2 * x] << 8 | cur[2 * x + 1]);
        } else {
            pack_row(cur, (uint32_t *)out + y * width, width, layout);
        }
        uint8_t *swap = prev;
        prev = cur;
        cur = swap;
    }
    return -1;
}

/* The Python-facing part of both functions: check the sizes, unfilter without the GIL, raise. */
static PyObject *unfilter_checked(Py_buffer *data, Py_ssize_t width, Py_ssize_t height, int layout, Py_buffer *out)
{
    PyObject *result = NULL;
    uint8_t *rows = NULL;
    int bpp = layout == GREY16 ? 2 : layout, out_size = layout == GREY16 ? 2 : 4, bad_filter = 0;
    Py_ssize_t bad_row;
    if (width <= 0 || height <= 0 || width > PY_SSIZE_T_MAX / 8 / height) {
        PyErr_Format(PyExc_ValueError, "bad image geometry: %zd x %zd", width, height);
        goto done;
    }
    Py_ssize_t stride = width * bpp;
    if (data->len != height * (stride + 1)) {
        PyErr_Format(PyExc_ValueError, "the image data has %zd bytes, expected %zd for %zd rows of %zd pixels",
                     data->len, height * (stride + 1), height, width);
        goto done;
    }
    if (out->len != width * height * out_size) {
        PyErr_Format(PyExc_ValueError, "the output buffer has %zd bytes, expected %zd", out->len,
                     width * height * out_size);
        goto done;
    }
    rows = calloc(2, (size_t)stride); /* the row above the first is all zeros */
    if (rows == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    bad_row = unfilter_image(data->buf, width, height, layout, rows, out->buf, &bad_filter);
    Py_END_ALLOW_THREADS
    if (bad_row >= 0) {
        PyErr_Format(PyExc_ValueError, "row %zd has the unknown filter type %d", bad_row, bad_filter);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(rows);
    PyBuffer_Release(data);
    PyBuffer_Release(out);
    return result;
}

PyDoc_STRVAR(unfilter_doc,
"unfilter(data, width, height, channels, out)\n--\n\n"
"Undo the row filters of an inflated 8-bit, non-interlaced PNG image.\n\n"
"data: the inflated IDAT stream, height rows of one filter-type byte and width * channels bytes.\n"
"channels: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA. out: a writable buffer of width * height\n"
"uint32 (native byte order) that receives the packed pixels. Raises ValueError for a wrong size\n"
"or an unknown filter type (naming the row).");

static PyObject *unfilter(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    Py_ssize_t width, height;
    int channels;
    if (!PyArg_ParseTuple(args, "y*nniw*:unfilter", &data, &width, &height, &channels, &out))
        return NULL;
    if (channels < 1 || channels > 4) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "channels must be 1 to 4, not %d", channels);
    }
    return unfilter_checked(&data, width, height, channels, &out);
}

PyDoc_STRVAR(unfilter_grey16_doc,
"unfilter_grey16(data, width, height, out)\n--\n\n"
"Undo the row filters of an inflated 16-bit greyscale, non-interlaced PNG image.\n\n"
"data: the inflated IDAT stream, height rows of one filter-type byte and 2 * width bytes (each\n"
"sample big-endian). out: a writable buffer of width * height uint16 (native byte order) that\n"
"receives the samples. Raises ValueError for a wrong size or an unknown filter type (naming the row).");

static PyObject *unfilter_grey16(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    Py_ssize_t width, height;
    if (!PyArg_ParseTuple(args, "y*nnw*:unfilter_grey16", &data, &width, &height, &out))
        return NULL;
    return unfilter_checked(&data, width, height, GREY16, &out);
}

static PyMethodDef methods[] = {
    {"unfilter", unfilter, METH_VARARGS, unfilter_doc},
    {"unfilter_grey16", unfilter_grey16, METH_VARARGS, unfilter_grey16_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_png_unfilter", "PNG scanline unfiltering into packed 32-bit pixels.", -1, methods,
};

PyMODINIT_FUNC PyInit__png_unfilter(void)
{
    return PyModule_Create(&module);
}
