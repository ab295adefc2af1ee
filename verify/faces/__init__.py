"""Photos -> faces: load (EXIF, any mode -> RGB), detect (MTCNN), align (similarity warp), and the one
pipeline from photos or decoded arrays to embedded faces.

Coordinates: landmarks and boxes are in pixel-index coordinates (the centre of pixel (i, j) is at
x=i, y=j), both in the image and in the crop.
"""

from verify.faces.align import align, check_rgb, fixed_crop, similarity_transform
from verify.faces.detect import DetectorConfig, Face, FaceDetector, face_to_original, to_original
from verify.faces.load import DEFAULT_MAX_PIXELS, ImageLoadError, is_image_file, load_for_detection, load_image, shrink
from verify.faces.pipeline import AlignedFace, FacePipeline, ImageFaces, ImageInput, error_summary

__all__ = [
    "DEFAULT_MAX_PIXELS", "AlignedFace", "DetectorConfig", "Face", "FaceDetector", "FacePipeline", "ImageFaces",
    "ImageInput", "ImageLoadError", "align", "check_rgb", "error_summary", "face_to_original", "fixed_crop",
    "is_image_file", "load_for_detection", "load_image", "shrink", "similarity_transform", "to_original",
]
