"""The machinery of the pages bitcli writes (`bit eval --report`'s gallery, `bit explain`'s overlays, the data
audit): `html` (text escaped in one place, the page skeleton with its CSS inline), `pictures` (thumbnails and
heat-map overlays drawn with numpy and Pillow) and `folder` (the output folder's write rules). What a page
shows is decided by its own module (bitcli.gallery for eval's report)."""
