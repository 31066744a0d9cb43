/**
 * End-to-end encryption of room payloads with WebCrypto (browsers, Node >= 20).
 *
 * One AES-256-GCM key per room, derived from a shared passphrase with PBKDF2-SHA-256
 * (100,000 iterations) and a salt made of this scheme's label, an optional application salt
 * and the room's name: a key never decrypts another room's messages, and a dictionary
 * attack on the passphrase has to start over for every room (and application). Every
 * message gets a fresh 96-bit IV, and the room's name is bound to the ciphertext as
 * associated data: a message moved to another room, or altered, fails to decrypt.
 *
 * On the wire a payload becomes `{"enc":"A256GCM","v":2,"iv":"<base64>","ct":"<base64>"}`:
 * the server relays it without being able to read it. What this does and does not protect
 * against is in the package's README ("End-to-end encryption").
 */

/** The envelope an encrypted payload travels in. */
export interface Encrypted {
  enc: "A256GCM";
  v: 2;
  iv: string;
  ct: string;
}

const LABEL = "supersynk-reliable-e2e";
const VERSION = 2;

/** WebCrypto's `SubtleCrypto`, typed loosely so that no DOM type leaks into the .d.ts. */
function subtle(): SubtleCrypto {
  const s = (globalThis as any).crypto?.subtle as SubtleCrypto | undefined;
  if (!s) throw new Error("WebCrypto (crypto.subtle) is not available here (browsers need a secure context)");
  return s;
}

function toBase64(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function fromBase64(text: string): Uint8Array<ArrayBuffer> {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

const utf8 = (s: string): Uint8Array<ArrayBuffer> => new TextEncoder().encode(s) as Uint8Array<ArrayBuffer>;

/** The associated data of a room's messages. */
function aad(room: string): Uint8Array<ArrayBuffer> {
  return utf8(JSON.stringify([LABEL, VERSION, room]));
}

/**
 * A shared passphrase, ready to encrypt and decrypt the payloads of any room. Make one with
 * {@link importKey}; room keys are derived on first use and kept.
 */
export class E2EKey {
  /** The passphrase as PBKDF2 key material (a `CryptoKey`). */
  private readonly material: Promise<CryptoKey>;
  private readonly salt: string;
  /** Room name -> AES-GCM key. */
  private readonly rooms = new Map<string, Promise<CryptoKey>>();

  /** Use {@link importKey}. */
  constructor(passphrase: string, salt = "") {
    this.salt = salt;
    this.material = Promise.resolve().then(() =>
      subtle().importKey("raw", utf8(passphrase), "PBKDF2", false, ["deriveKey"]),
    );
  }

  private roomKey(room: string): Promise<CryptoKey> {
    let key = this.rooms.get(room);
    if (!key) {
      key = this.material.then((material) =>
        subtle().deriveKey(
          { name: "PBKDF2", salt: utf8(`${LABEL}/v${VERSION}\0${this.salt}\0${room}`), iterations: 100_000, hash: "SHA-256" },
          material,
          { name: "AES-GCM", length: 256 },
          false,
          ["encrypt", "decrypt"],
        ),
      );
      this.rooms.set(room, key);
    }
    return key;
  }

  /** Encrypts `data` (its JSON text) for `room`. */
  async encrypt(room: string, data: unknown): Promise<Encrypted> {
    const key = await this.roomKey(room);
    const iv = new Uint8Array(12);
    (globalThis as any).crypto.getRandomValues(iv);
    const plain = utf8(JSON.stringify(data === undefined ? null : data));
    const ct = new Uint8Array(await subtle().encrypt({ name: "AES-GCM", iv, additionalData: aad(room) }, key, plain));
    return { enc: "A256GCM", v: VERSION, iv: toBase64(iv), ct: toBase64(ct) };
  }

  /**
   * Decrypts a payload published in `room`; throws if it is not an envelope of this scheme,
   * if the passphrase (or salt) differs, or if the ciphertext was altered or comes from
   * another room.
   */
  async decrypt(room: string, e: unknown): Promise<unknown> {
    if (!isEncrypted(e)) throw new Error("not an encrypted payload");
    const key = await this.roomKey(room);
    const plain = await subtle().decrypt({ name: "AES-GCM", iv: fromBase64(e.iv), additionalData: aad(room) }, key, fromBase64(e.ct));
    return JSON.parse(new TextDecoder().decode(plain));
  }
}

/** The key type of the `e2eKey` option. */
export type Key = E2EKey;

/**
 * Prepares a passphrase for `e2eKey`. `salt` (optional, not secret) is mixed into every
 * room's key: give each application its own, so that one room name in two applications
 * does not share a derivation.
 */
export async function importKey(passphrase: string, options: { salt?: string } = {}): Promise<Key> {
  const key = new E2EKey(passphrase, options.salt ?? "");
  // Fails here, not at the first message, where WebCrypto is missing.
  await key["material"];
  return key;
}

/** Whether `v` has the shape of an envelope of this scheme. */
export function isEncrypted(v: unknown): v is Encrypted {
  const e = v as Encrypted;
  return (
    typeof e === "object" && e !== null && e.enc === "A256GCM" && e.v === VERSION && typeof e.iv === "string" && typeof e.ct === "string"
  );
}
