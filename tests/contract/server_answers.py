"""A STUB OF THE OMERO SERVER'S ANSWERS for the blitz backend's registration code (not a server).

It answers the few calls ``BlitzSession.register_content`` and the OMERO self-test make, with
real omero-py model objects shaped as the server returns them:

- objects loaded by ``IQuery.get``/``findAllByQuery`` have every collection unloaded
  (omero-server ``ProxyCleanupFilter`` nulls uninitialised collections; omero-py then raises
  ``UnloadedEntityException`` on ``linkAnnotation``/``linkDataset``), except those a query
  ``join fetch``es;
- references the server returns are unloaded proxies (``ImageI(id, False)``);
- the pixel buffer answers as omero-server does for a registered image: the OME-Zarr buffer
  (omero-zarr-pixel-buffer: one resolution level per NGFF dataset, big-endian tiles), or, where
  the extension is missing or cannot read the store, the ROMIO buffer omero-romio opens instead
  (``ZarrPixelsService`` returns null): one level, no data.

What it records (``images``, ``links``, ``deleted``...) is what the tests check. It proves the
client side (model objects, call order, cleanup); whether a real server accepts these saves is
on the closing checklist.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import omero.model
import omero.rtypes

import omero
from biomero_importer.omero.blitz import CHANNELS_HQL, PIXELS_TYPE_HQL, pixels_hql
from biomero_importer.omero.zarr import ZarrImage, check_tile_size, expected_tile


def server_shaped(obj: Any, fetched: dict[str, list[Any]] | None = None) -> Any:
    """``obj`` as the server returns it: collections unloaded except the ``fetched`` ones
    (``join fetch``), which hold the given items."""
    obj.unloadCollections()
    for name, items in (fetched or {}).items():
        # what Ice's unmarshalling sets for a fetched collection
        setattr(obj, f"_{name}Seq", list(items))
        setattr(obj, f"_{name}Loaded", True)
    return obj


@dataclass
class StoredImage:
    name: str
    pixels_id: int
    channel_ids: list[int]
    lsid: str | None = None
    physical_sizes: dict[str, tuple[float, str]] = field(default_factory=dict)
    channel_names: dict[int, str] = field(default_factory=dict)


Buffer = Literal["zarr", "romio"]


class StubServerAnswers:
    """Stands where ``BlitzSession.conn`` (a BlitzGateway) stands."""

    def __init__(self, *, buffer: Buffer = "zarr", stores: dict[str, ZarrImage] | None = None):
        self.SERVICE_OPTS: dict[str, str] = {}
        self.buffer = buffer
        # what the server's pixel buffer reads for an ExternalInfo lsid
        self.stores = stores or {}
        self._ids = itertools.count(100)
        self.images: dict[int, StoredImage] = {}
        self.comments: dict[int, str] = {}
        self.annotation_links: list[tuple[str, int, int]] = []  # (kind, parent, annotation)
        self.dataset_links: list[tuple[int, int]] = []  # (dataset, image)
        self.plates: dict[int, Any] = {}
        self.deleted: list[tuple[str, int]] = []
        self.deleted_with_annotations: list[tuple[str, int]] = []
        self.calls: list[str] = []
        # test hooks: raise this from the next call of that name (e.g. "setPixelsId"), or
        # from the save that holds a DatasetImageLink
        self.refuse: dict[str, Exception] = {}
        self.refuse_dataset_link: Exception | None = None
        self.c = SimpleNamespace(sf=SimpleNamespace(createRawPixelsStore=self._raw_pixels_store))

    # --- what the backend calls ---------------------------------------------------------
    def getQueryService(self) -> Any:
        return SimpleNamespace(
            get=self._answer("get", self._get),
            findByQuery=self._answer("findByQuery", self._find_by_query),
            findAllByQuery=self._answer("findAllByQuery", self._find_all_by_query),
            projection=self._answer("projection", self._projection),
        )

    def getUpdateService(self) -> Any:
        return SimpleNamespace(
            saveAndReturnObject=self._answer("saveAndReturnObject", self._save_and_return),
            saveArray=self._answer("saveArray", self._save_array),
        )

    def getPixelsService(self) -> Any:
        return SimpleNamespace(createImage=self._answer("createImage", self._create_image))

    def deleteObjects(
        self,
        kind: str,
        ids: list[int],
        deleteAnns: bool = False,
        deleteChildren: bool = False,
        wait: bool = False,
    ) -> None:
        """BlitzGateway.deleteObjects (Delete2); ``wait`` raises what the server refused."""
        self._refused("deleteObjects")
        assert wait, "a delete not waited for can fail unseen"
        for object_id in ids:
            self.deleted.append((kind, object_id))
            if deleteAnns:
                self.deleted_with_annotations.append((kind, object_id))
            if kind == "Image":
                self.images.pop(object_id, None)
                self.annotation_links = [
                    link for link in self.annotation_links if link[:2] != ("Image", object_id)
                ]
                self.dataset_links = [link for link in self.dataset_links if link[1] != object_id]
            elif kind == "Plate":
                self.plates.pop(object_id, None)
            elif kind == "Annotation":
                self.comments.pop(object_id, None)

    def close(self) -> None:
        pass

    # --- answers ------------------------------------------------------------------------
    def _answer(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def answer(*args: Any) -> Any:
            self._refused(name)
            return call(*args)

        return answer

    def _refused(self, name: str) -> None:
        self.calls.append(name)
        exc = self.refuse.pop(name, None)
        if exc is not None:
            raise exc

    def _get(self, kind: str, object_id: int, ctx: Any) -> Any:
        assert kind == "Image", kind
        stored = self.images.get(object_id)
        if stored is None:
            raise omero.ValidationException(None, None, f"no Image {object_id}")
        image = omero.model.ImageI(object_id, True)
        image.setName(omero.rtypes.rstring(stored.name))
        if stored.lsid is not None:
            image.getDetails().setExternalInfo(omero.model.ExternalInfoI(object_id + 10_000, False))
        return server_shaped(image)

    def _find_by_query(self, hql: str, params: Any, ctx: Any) -> Any:
        assert hql == PIXELS_TYPE_HQL, hql
        return omero.model.PixelsTypeI(1, False)

    def _find_all_by_query(self, hql: str, params: Any, ctx: Any) -> list[Any]:
        assert hql == CHANNELS_HQL, hql
        image_id = omero.rtypes.unwrap(params.map["id"])
        stored = self.images.get(image_id)
        if stored is None:
            return []
        channels = []
        for index, channel_id in enumerate(stored.channel_ids):
            logical = server_shaped(omero.model.LogicalChannelI(channel_id, True))
            name = stored.channel_names.get(index)
            if name is not None:
                logical.setName(omero.rtypes.rstring(name))
            channel = server_shaped(omero.model.ChannelI(channel_id, True))
            channel.setLogicalChannel(logical)
            channels.append(channel)
        pixels = omero.model.PixelsI(stored.pixels_id, True)
        pixels.setImage(omero.model.ImageI(image_id, False))
        return [server_shaped(pixels, {"channels": channels})]

    def _projection(self, hql: str, params: Any, ctx: Any) -> list[list[Any]]:
        assert hql == pixels_hql("Image"), hql
        stored = self.images.get(omero.rtypes.unwrap(params.map["id"]))
        return [] if stored is None else [[omero.rtypes.rlong(stored.pixels_id)]]

    def _create_image(self, *args: Any) -> Any:
        """``IPixels.createImage(x, y, z, t, channels, type, name, description, ctx)``."""
        channels, name = args[4], args[6]
        image_id = next(self._ids)
        self.images[image_id] = StoredImage(
            name, next(self._ids), [next(self._ids) for _ in channels]
        )
        return omero.rtypes.rlong(image_id)

    def _new_id(self, obj: Any) -> Any:
        obj.setId(omero.rtypes.rlong(next(self._ids)))
        return obj

    def _save_and_return(self, obj: Any, ctx: Any) -> Any:
        if isinstance(obj, omero.model.CommentAnnotationI):
            saved = self._new_id(obj)
            self.comments[saved.getId().getValue()] = saved.getTextValue().getValue()
            return saved
        assert isinstance(obj, omero.model.PlateI), type(obj)
        saved = self._new_id(obj)
        for well in saved.copyWells():
            for sample in well.copyWellSamples():
                assert sample.getImage().getId().getValue() in self.images
        for link in saved.copyAnnotationLinks():
            self.annotation_links.append(
                ("Plate", saved.getId().getValue(), link.getChild().getId().getValue())
            )
        self.plates[saved.getId().getValue()] = saved
        return saved

    def _save_array(self, objects: list[Any], ctx: Any) -> None:
        """One transaction: nothing is recorded unless every object is acceptable."""
        if self.refuse_dataset_link is not None and any(
            isinstance(obj, omero.model.DatasetImageLinkI) for obj in objects
        ):
            raise self.refuse_dataset_link
        changes: list[Callable[[], None]] = []
        for obj in objects:
            changes.append(self._accept(obj))
        for change in changes:
            change()

    def _existing_image(self, proxy: Any) -> int:
        image_id = int(proxy.getId().getValue())
        if image_id not in self.images:
            raise omero.ValidationException(None, None, f"no Image {image_id}")
        return image_id

    def _accept(self, obj: Any) -> Callable[[], None]:
        if isinstance(obj, omero.model.ImageI):
            stored = self.images[self._existing_image(obj)]
            lsid = obj.getDetails().getExternalInfo().getLsid().getValue()
            return lambda: setattr(stored, "lsid", lsid)
        if isinstance(obj, omero.model.ImageAnnotationLinkI):
            image_id = self._existing_image(obj.getParent())
            annotation = int(obj.getChild().getId().getValue())
            return lambda: self.annotation_links.append(("Image", image_id, annotation))
        if isinstance(obj, omero.model.DatasetImageLinkI):
            image_id = self._existing_image(obj.getChild())
            dataset = int(obj.getParent().getId().getValue())
            return lambda: self.dataset_links.append((dataset, image_id))
        if isinstance(obj, omero.model.PixelsI):
            stored = next(s for s in self.images.values() if s.pixels_id == obj.getId().getValue())
            sizes = {
                axis: (length.getValue(), str(length.getUnit()))
                for axis in ("X", "Y", "Z")
                if (length := getattr(obj, f"getPhysicalSize{axis}")()) is not None
            }
            return lambda: stored.physical_sizes.update(sizes)
        if isinstance(obj, omero.model.LogicalChannelI):
            logical_id = obj.getId().getValue()
            stored = next(s for s in self.images.values() if logical_id in s.channel_ids)
            index = stored.channel_ids.index(logical_id)
            name = obj.getName().getValue()
            return lambda: stored.channel_names.update({index: name})
        raise AssertionError(f"unexpected save of {type(obj).__name__}")

    # --- the pixel buffer ---------------------------------------------------------------
    def _raw_pixels_store(self) -> Any:
        state: dict[str, Any] = {}

        def set_pixels_id(pixels_id: int, bypass: bool, ctx: Any) -> None:
            self._refused("setPixelsId")
            stored = next(s for s in self.images.values() if s.pixels_id == pixels_id)
            # omero-server opens a buffer whatever happens (ROMIO when Zarr fails)
            state["image"] = self.stores.get(stored.lsid or "") if self.buffer == "zarr" else None
            state["level"] = None

        def levels() -> int:
            image = state["image"]
            return 1 if image is None else len(image.levels)

        def set_level(level: int) -> None:
            if state["image"] is None:
                raise omero.InternalException(None, None, "ROMIO has one resolution level")
            state["level"] = level

        def tile(*args: int) -> bytes:
            """``getTile(z, c, t, x, y, w, h)``."""
            w, h = args[5:]
            image = state["image"]
            if image is None:
                return bytes(w * h * 2)  # a fresh ROMIO buffer: zeros
            assert args[:5] == (0, 0, 0, 0, 0) and (w, h) == check_tile_size(image)
            assert state["level"] in (None, len(image.levels) - 1), "not the full resolution"
            data = expected_tile(image)
            assert data is not None
            return data

        return SimpleNamespace(
            setPixelsId=set_pixels_id,
            getResolutionLevels=levels,
            setResolutionLevel=set_level,
            getTile=tile,
            close=lambda: None,
        )
