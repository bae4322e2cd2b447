"""The FFCV engine's image decoder: each sample's view, drawn from (seed, epoch, index) as every engine draws
it, decoded from only the part of the JPEG the view keeps (`jpeg_crop`) and flipped, in FFCV's compiled
threads. FFCV's own decoders decode every whole image and draw their crops from per-thread generators."""
import numpy as np

from supmae.pipelines.augment import view
from supmae.pipelines.jpeg_crop import jpeg_view, load_int64
from supmae.pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import resize_crop
    from ffcv.pipeline.compiler import Compiler


class ViewDecoder(ResizedCropRGBImageDecoder):
    """Random resized crops of `scale` of the area and flips with `train`, else the centre square of `fraction`
    of the shorter side, at `output_size`. Set `epoch` before each epoch's iteration begins."""

    def __init__(self, output_size: tuple[int, int], *, seed: int, train: bool, scale: tuple[float, float],
                 fraction: float):
        super().__init__(output_size)  # FFCV's parent sizes the output and a scratch buffer per sample
        self.seed, self.train, self.scale, self.fraction = seed, train, scale, fraction
        self._epoch = np.zeros(1, np.int64)  # read through its address: compiled code would freeze a copy

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    @property
    def get_crop_generator(self):  # FFCV's parent declares it; this decoder draws with `view` instead
        return view

    def generate_code(self):
        jpg, read, each = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        resize_raw = Compiler.compile(resize_crop)
        seed, train, (low, high), fraction = self.seed, self.train, self.scale, self.fraction
        epoch_address = self._epoch.ctypes.data

        def decode(indices, storage, metadata, storage_state):
            destination, scratch = storage
            epoch = load_int64(epoch_address)
            out_height, out_width = destination.shape[1], destination.shape[2]
            failed = np.zeros(len(indices), np.bool_)  # raising inside the loop would stop numba running it in parallel
            for i in each(len(indices)):
                index = indices[i]
                field = metadata[index]
                # FFCV annotates its reader with one argument; its compiled readers take the state too
                data = read(field["data_ptr"], storage_state)  # pyright: ignore[reportCallIssue]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                left, top, w, h, flip = view(width, height, seed, epoch, index, train, low, high, fraction)
                if field["mode"] == jpg:
                    failed[i] = jpeg_view(data.ctypes.data, data.size, left, top, w, h, destination[i].ctypes.data,
                                          out_height, out_width, flip, scratch[i].ctypes.data, scratch[i].size) != 0
                else:  # stored as pixels (convert's smart and raw modes): FFCV's own area resize
                    resize_raw(data.reshape(height, width, 3), top, top + h, left, left + w, destination[i])
                    if flip:
                        destination[i] = destination[i][:, ::-1].copy()
            if failed.any():  # convert decoded every image it wrote: the file has changed since
                raise ValueError("a .beton image no longer decodes")
            return destination[:len(indices)]

        decode.is_parallel = True
        return decode
