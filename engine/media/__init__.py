"""Reading what users hand in: images (EXIF, bomb guards), PDF pages (PDFium) and video frames (FFmpeg). Imports only
engine.storage and engine.settings; used by the diffusion side, the VLM side and ray_jobs alike."""
